"""vml web: the release manager, the seeds' web page to see, start, save and share VMs.

Pages are rendered on the server (Jinja2) and made live with htmx, both
served by `vml web` itself; handlers call the library in-process, as the
CLI does, and hold no policy of their own. See docs/web.md.
"""
