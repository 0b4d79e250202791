"""vmlfs: the logbook as a FUSE file system (pyfuse3 + trio).

An adapter only: inode numbers, attributes and errno. What entries contain
and how their bytes are rebuilt lives in the vml library (vml.view.logbook).
"""
