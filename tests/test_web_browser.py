"""The release manager in a real browser: headless Chromium driven by Selenium.

One `vml web` serves a home with a local repository holding the busybox
test guest, an empty second repository, and a remote published by real
nginx (reached through a relay that trickles, so that a preload takes long
enough to watch). The logbook is not mounted at first: Start mounts it.
Chromium reaches nothing but 127.0.0.1 (host resolver rules and a dead
proxy for everything else), and every page is checked to have loaded
nothing from another origin. Screenshots of every page go to the test's
tmp directory.
"""

import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_boot import DOMAIN_XML

from vml import config, overview

from conftest import Vml, need, need_fuse
from servers import FaultProxy, end_process, free_port, wait_port

WAIT = 180
PAGES = {
    "available": "/",
    "running": "/running",
    "configure": "/configure",
    "cache": "/cache",
    "usage": "/usage",
    "backup": "/backup",
    "share": "/share",
    "customize": "/start?entry=rep1:guest",
}


class Site:
    """The served home, the browser, and what the tests look at."""

    def __init__(self, root: Path, vml: Vml, web_url: str, proc, driver, shots: Path, downloads: Path, mnt: Path):
        self.root, self.vml, self.url, self.proc, self.driver = root, vml, web_url, proc, driver
        self.shots, self.downloads, self.mnt = shots, downloads, mnt

    def get(self, page: str):
        self.driver.get(self.url + page)
        self.wait(lambda d: d.execute_script("return document.readyState") == "complete")

    def wait(self, until, timeout: float = WAIT, what: str = ""):
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        # The live parts are replaced every second or two: an element may go stale between two looks.
        ignored = (NoSuchElementException, StaleElementReferenceException)
        return WebDriverWait(self.driver, timeout, 0.2, ignored).until(until, what)

    def css(self, selector: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def all(self, selector: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def text(self, selector: str) -> str:
        """The text of the first element matching ``selector`` now ("" if none): one look, never stale."""
        return self.js("const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", selector)

    def area_state(self, area: str) -> str | None:
        return self.js("const e = document.getElementById(arguments[0]); return e && e.dataset.state", f"area-{area}")

    def select(self, selector: str, value: str) -> None:
        from selenium.webdriver.support.select import Select

        Select(self.css(selector)).select_by_value(value)

    def cards(self) -> list[dict]:
        return self.js(
            """return [...document.querySelectorAll('#jobs .job')].map(c => ({
                title: (c.querySelector('.title') || {}).innerText, state: c.className, text: c.innerText,
                progress: (c.querySelector('progress[value]') || {}).value}))"""
        )

    def job(self, title: str) -> str:
        """Wait for the newest job card titled ``title`` to end; its text, which must say done."""

        def ended(d):
            card = next((c for c in self.cards() if c["title"] == title), None)
            return card if card and "running" not in card["state"] else False

        card = self.wait(ended, what=f"job {title!r} did not end")
        assert "done" in card["state"], card["text"]
        return card["text"]

    def shot(self, name: str) -> None:
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))

    def requests(self) -> list[str]:
        """URLs the browser requested since the last call (from its performance log)."""
        urls = []
        for entry in self.driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg["method"] == "Network.requestWillBeSent":
                urls.append(msg["params"]["request"]["url"])
        return urls


def chromium(downloads: Path):
    need("chromium", "chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1300,1000",
        # Every other origin is unreachable: names resolve to nothing, and addresses go to a dead proxy.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1",
        "--disable-background-networking",
        "--disable-component-update",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return driver


@pytest.fixture(scope="module")
def site(tmp_path_factory, guest_disk, published, origin):
    need_fuse()
    need("qemu-system-x86_64", "mcopy")
    root = tmp_path_factory.mktemp("web")
    vml = Vml(root / "home", root)
    vm = root / "vm"
    vm.mkdir()
    shutil.copy(guest_disk, vm / "disk.img")
    (vm / "domain.xml").write_text(DOMAIN_XML)
    subprocess.run(["mcopy", "-i", vm / "disk.img", "-", "::STAY.TXT"], input=b"stay\n", check=True)
    vml("init", root / "rep1")
    vml("save", "guest", "--from", vm, "-m", "the busybox test guest")
    vml("init", root / "rep2")
    need("chromium", "chromedriver")
    relay = FaultProxy(origin.port, mode="slow", rate=2 << 20)  # its three packs (14 MB) arrive over seconds
    mnt, port = root / "mnt", free_port()
    proc = driver = None
    try:
        vml("remote", "add", "cern", relay.url, "--key", published["pubkey"])
        proc = subprocess.Popen(
            [sys.executable, "-m", "vml", "web", "--listen", f"127.0.0.1:{port}", "--mountpoint", mnt],
            env=dict(vml.env, VML_ACCEL="tcg"),
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=open(root / "web.log", "w"),  # noqa: SIM115 (kept open for the server's life)
        )
        wait_port(port, proc, "vml web")
        shots, downloads = root / "screenshots", root / "downloads"
        shots.mkdir()
        downloads.mkdir()
        driver = chromium(downloads)
        yield Site(root, vml, f"http://127.0.0.1:{port}", proc, driver, shots, downloads, mnt)
    finally:
        if driver is not None:
            driver.quit()
        r = vml("status", "--json", ok=False)
        for item in json.loads(r.stdout or "[]"):
            if item["state"] in ("running", "paused"):
                vml("stop", item["area"], "--force", ok=False)
            vml("close", item["area"], "--discard", ok=False)
        if proc is not None:
            end_process(proc, 90)
        vml("umount", mnt, ok=False)
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)
        relay.stop()


def test_available_lists_local_and_published_entries_with_their_places(site, origin):
    site.get("/")
    assert "Available (3)" in site.css(".tabs").text  # guest, and the remote's base and e2
    row = site.css('tr[data-entry="cern:e2"]')
    assert row.find_element("css selector", ".mount-path").text == f"{site.mnt}/cern/e2"
    book = site.css("#book-cern")
    assert book.find_element("css selector", ".http-address").text.startswith("http://127.0.0.1:")
    assert config.Config.load(site.root / "home").remotes["cern"].url in book.text
    assert str(site.root / "home" / "cache" / "cern") in book.text
    assert site.css('tr[data-entry="rep1:guest"]').find_element("css selector", "button.start")
    site.shot("available")


def test_start_boots_the_guest_and_running_follows_it_live_through_stop_save_and_close(site):
    site.get("/")
    assert "logbook not mounted" in site.css("body > header").text
    site.css('tr[data-entry="rep1:guest"] button.start').click()
    text = site.job("Start rep1:guest")
    assert "booted area guest on qemu" in text

    site.get("/running")
    site.driver.execute_script("window.vmlMarker = 'same page'")
    site.wait(lambda d: site.area_state("guest") == "running", what="the area does not run")
    alive = lambda: [int(n) for n in re.findall(r"VML-GUEST-ALIVE (\d+)", site.text("#area-guest pre.console"))]  # noqa: E731
    first = site.wait(lambda d: alive(), what="no console output")[-1]
    site.wait(lambda d: max(alive() or [0]) > first + 1, what="the console did not move on without a reload")
    assert "uptime 0:0" in site.text("#area-guest > header")
    site.shot("running-live")
    assert site.driver.execute_script("return window.vmlMarker") == "same page"  # updated without a reload

    site.css("#area-guest button.stop").click()
    assert "area guest:" in site.job("Stop guest")
    site.wait(lambda d: site.area_state("guest") == "stopped", what="the area did not stop")

    site.css("#save-guest input[name=entry]").send_keys("after-web")
    site.css("#save-guest input[name=message]").send_keys("saved from the release manager")
    site.css("#save-guest button.save").click()
    assert "saved after-web in rep1" in site.job("Save guest as after-web")
    assert site.driver.execute_script("return window.vmlMarker") == "same page"

    site.get("/")
    row = site.css('tr[data-entry="rep1:after-web"]')
    assert "incremental" in row.text and "saved from the release manager" in row.text
    assert (site.mnt / "rep1" / "after-web" / "disk.img").exists()

    site.get("/running")
    site.css("#area-guest button.close").click()
    assert "closed working area guest" in site.job("Close guest")
    site.wait(lambda d: site.area_state("guest") is None, what="the closed area is still listed")
    assert not (site.root / "home" / "areas" / "guest").exists()


def test_preload_shows_progress_and_the_cache_page_the_bytes(site):
    site.get("/cache")
    assert int(site.css("#cache-cern td.used").get_attribute("data-bytes")) < 1 << 20
    site.select("#cache-cern select[name=entry]", "cern:e2")
    site.css("#cache-cern button.preload").click()
    seen = set()

    def progressed(d):
        cards = [c for c in site.cards() if c["title"] == "Preload cern:e2"]
        seen.update(int(c["progress"]) for c in cards if c["progress"] is not None and "running" in c["state"])
        return cards and "running" not in cards[0]["state"]

    site.wait(progressed, what="the preload did not end")
    assert "objects cached" in site.job("Preload cern:e2")
    assert [p for p in seen if 0 < p < 100], f"no progress between 0 and 100 % was shown: {sorted(seen)}"
    site.get("/cache")
    shown = int(site.css("#cache-cern td.used").get_attribute("data-bytes"))
    status = overview.cache_status(config.Config.load(site.root / "home"))[0]
    assert shown == status["size"] and shown > 10 << 20
    site.shot("cache")


def test_a_bundle_downloads_and_imports_into_a_second_repository(site):
    site.get("/share")
    site.select("select[name=entry]", "rep1:guest")
    site.css("input[name=full]").click()
    site.css("button.export").click()
    assert "bundle of guest" in site.job("Export rep1:guest")
    site.css("#jobs a.download").click()
    bundle = site.downloads / "guest.vml"
    site.wait(lambda d: bundle.exists() and not list(site.downloads.glob("*.crdownload")), what="no download")

    site.css("input[name=bundle]").send_keys(str(bundle))
    site.select("select[name=repo]", "rep2")
    site.css("button.import").click()
    assert "imported guest into rep2" in site.job("Import guest.vml")
    site.vml("verify", "--repo", "rep2")
    rep1 = config.Config.load(site.root / "home").open("rep1").entry("guest")
    rep2 = config.Config.load(site.root / "home").open("rep2").entry("guest")
    assert rep1.digest == rep2.digest
    site.shot("share")


def test_every_page_renders_completely_with_every_other_origin_blocked(site):
    site.requests()  # forget what came before
    for name, page in PAGES.items():
        site.get(page)
        assert site.driver.execute_script("return typeof htmx") == "object", name
        color = site.driver.execute_script("return getComputedStyle(document.querySelector('nav')).backgroundColor")
        assert color == "rgb(246, 248, 250)", f"{name}: the style sheet did not apply"
        assert site.css("main h2").text, name
        site.shot(name)
        errors = [e for e in site.driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], f"{name}: {errors}"
        foreign = [u for u in site.requests() if not u.startswith((site.url + "/", "data:"))]
        assert foreign == [], f"{name} asked another origin for {foreign}"
    assert {p.stem for p in site.shots.glob("*.png")} >= set(PAGES)


def test_a_cross_site_form_post_is_refused(site, tmp_path):
    attack = tmp_path / "attack"
    attack.mkdir()
    target = site.root / "rep-evil"
    (attack / "index.html").write_text(
        f"""<!doctype html><form method="post" action="{site.url}/repositories">
        <input name="path" value="{target}"></form><script>document.forms[0].submit()</script>"""
    )
    port = free_port()
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(attack), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        site.driver.get(f"http://127.0.0.1:{port}/")
        site.wait(lambda d: d.current_url.startswith(site.url), what="the form was not sent")
        site.wait(lambda d: "refused" in d.find_element("tag name", "body").text)
        time.sleep(1)
        assert not target.exists()
        assert "rep-evil" not in config.Config.load(site.root / "home").repositories
    finally:
        server.shutdown()
