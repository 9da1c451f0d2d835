"""spotcheck.ipynb in a real browser: JupyterLab on localhost with the lora_kit kernel, Debian's chromium driven
by Playwright, a small toy training run; a click on a verdict must reach spotcheck.jsonl and the progress count.

What it needs it installs: chromium, chromium-driver (and a CJK font, so the screenshot shows the Chinese
captions) with apt-get when missing, as root or through passwordless sudo. Playwright never downloads a
browser here: it launches Debian's executable. When the packages cannot be installed the test FAILS with
the reason and the fix, so a CI machine without a browser does not pass silently; a person who cannot
install packages opts out explicitly with LORA_KIT_BROWSER_TEST=skip.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lora_kit.paths import NOTEBOOKS_DIR

from test_train import tiny_params

pytestmark = pytest.mark.slow

PACKAGES = ("chromium", "chromium-driver", "fonts-wqy-microhei")
EXECUTABLES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage"]  # containers often give /dev/shm only 64 MB
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}


def chromium_executable() -> str:
    """Debian's chromium, installed with apt-get when it or its companions are missing."""
    if os.environ.get("LORA_KIT_BROWSER_TEST") == "skip":
        pytest.skip("LORA_KIT_BROWSER_TEST=skip: the browser test was switched off explicitly")
    missing = [p for p in PACKAGES if not _installed(p)]
    if missing:
        _apt_install(missing)
    found = next((p for p in EXECUTABLES if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.fail(f"chromium is installed but none of {EXECUTABLES} is executable; reinstall it: "
                    "apt-get install --reinstall chromium")
    return found


def _installed(package: str) -> bool:
    if shutil.which("dpkg-query") is None:
        pytest.fail("this test installs chromium with apt (Debian / Ubuntu); dpkg-query is missing here. Install "
                    "chromium, chromium-driver and fonts-wqy-microhei by other means, or set "
                    "LORA_KIT_BROWSER_TEST=skip")
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() == "install ok installed"  # not "... not-installed"


def _apt_install(packages: list[str]) -> None:
    if os.geteuid() == 0:
        prefix = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        prefix = ["sudo", "-n", "env", "DEBIAN_FRONTEND=noninteractive"]
    else:
        pytest.fail(f"{', '.join(packages)} missing and this user can neither apt-get (not root) nor sudo without a "
                    f"password. Fix: sudo apt-get install {' '.join(packages)}; or set LORA_KIT_BROWSER_TEST=skip")
    install = prefix + ["apt-get", "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300",
                        *packages]
    env = os.environ | APT_ENV
    out = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(prefix + ["apt-get", "update", "-o", "DPkg::Lock::Timeout=300"], capture_output=True,
                       text=True, env=env, timeout=600)
        out = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        pytest.fail(f"could not install {', '.join(packages)} with apt-get (exit {out.returncode}):\n"
                    f"{(out.stdout + out.stderr)[-2000:]}\nFix: install them by hand, or set LORA_KIT_BROWSER_TEST=skip")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """jupyter lab on 127.0.0.1 with a random token, isolated settings, and a cleanup that ends what it started."""

    def __init__(self, root: Path, home: Path):
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        home.mkdir()
        self.log_path = home / "jupyterlab.log"
        env = os.environ | {
            "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
            "OMP_NUM_THREADS": "1"}  # the kernel shares the CPU with chromium and the server
        news = home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        news.parent.mkdir(parents=True)
        news.write_text(json.dumps({"fetchNews": "false"}))  # no "get notified about Jupyter news?" toast
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={root}", "--ServerApp.allow_root=True", "--LabApp.expose_app_in_browser=True",
             "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"jupyter lab exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.api("/api/status")
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"jupyter lab did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """Shut kernels and server down through the API; then end the server's process group if still there."""
        try:
            for kernel in self.api("/api/kernels") or []:
                self.api(f"/api/kernels/{kernel['id']}", method="DELETE")
            self.api("/api/shutdown", method="POST")
        except OSError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def toy_run(toy_ckpt, mini_world, tmp_path) -> Path:
    """A real two-step training run of the toy (LoRA on the last 2 decoder layers, variant A1): baseline and
    checkpoint-2."""
    from lora_kit.config import load_config
    from lora_kit.train import train

    params = tiny_params(toy_ckpt, mini_world, tmp_path, max_steps=2, eval_steps=2, save_steps=2, crop_jitter_k=1,
                         eval_max_samples=2)
    return train(load_config([params], {"llm_last": 2, "vit_last": 0}), log=lambda *_: None)


def test_spotcheck_notebook_in_jupyterlab_with_chromium(toy_run, mini_world, tmp_path):
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    from playwright.sync_api import expect, sync_playwright

    executable = chromium_executable()
    try:
        KernelSpecManager().get_kernel_spec("lora_kit")
    except NoSuchKernel:
        pytest.fail("no Jupyter kernel named lora_kit: run make install (it registers the kernel in .venv)")
    lab_root = tmp_path / "lab"
    lab_root.mkdir()
    prepared = subprocess.run(
        [sys.executable, "-m", "papermill", "--prepare-only", str(NOTEBOOKS_DIR / "spotcheck.ipynb"),
         str(lab_root / "spotcheck.ipynb"), "-p", "runs", toy_run.name, "-p", "runs_root", str(toy_run.parent),
         "-p", "who", "browser-test", "-k", "lora_kit"], capture_output=True, text=True, timeout=120)
    assert prepared.returncode == 0, prepared.stderr[-2000:]

    for attempt in range(3):  # the free port may be taken before the server binds it
        lab = JupyterLab(lab_root, tmp_path / f"jupyter-{attempt}")
        try:
            lab.wait_ready()
            break
        except AssertionError:
            lab.stop()
            if "already in use" not in lab.log_tail() or attempt == 2:
                raise
    console = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, headless=True, args=BROWSER_ARGS, timeout=60_000)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
                page.goto(f"{lab.url}/lab/tree/spotcheck.ipynb?token={lab.token}", timeout=90_000)
                page.wait_for_function(  # the notebook is open and its lora_kit kernel is up
                    "() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                    " return !!(w && w.sessionContext && w.sessionContext.session &&"
                    " w.sessionContext.session.kernel && w.sessionContext.kernelDisplayStatus === 'idle'); }",
                    timeout=120_000)
                assert page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.name"
                                     ) == "lora_kit"
                page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")

                progress = page.locator(".spot-progress")
                expect(progress).to_contain_text("judged 0 / 10", timeout=150_000)  # 5 images x baseline, checkpoint-2
                button = page.locator(".spot-cell-1 .spot-verdict-degraded")  # image 1, checkpoint-2
                button.click()
                expect(progress).to_contain_text("judged 1 / 10", timeout=30_000)
                expect(button).to_have_class(re.compile(r"\bmod-warning\b"))

                keys = page.locator(".spot-keys input")
                keys.press("n")  # the next unjudged caption: image 2, baseline
                expect(page.locator(".spot-status")).to_contain_text("image 2/5", timeout=30_000)
                keys.press("1")
                expect(progress).to_contain_text("judged 2 / 10", timeout=30_000)
                page.locator(".spot-cell-0").scroll_into_view_if_needed()
                page.screenshot(path=str(tmp_path / "spotcheck.png"))
                print(f"screenshot: {tmp_path / 'spotcheck.png'}")
            finally:
                browser.close()
    except Exception as err:
        raise AssertionError(f"{err}\n--- browser console errors:\n" + "\n".join(console[-20:])
                             + f"\n--- jupyter lab log:\n{lab.log_tail()}") from err
    finally:
        lab.stop()

    rows = [json.loads(line) for line in (toy_run / "spotcheck.jsonl").read_text().splitlines()]
    spot = [json.loads(line) for line in (mini_world / "spotcheck.jsonl").read_text().splitlines() if line.strip()]
    images = [str((mini_world / r["images"][0]).resolve()) for r in spot]
    assert [(r["checkpoint"], r["image"], r["verdict"], r["who"]) for r in rows] == [
        ("checkpoint-2", images[0], "degraded", "browser-test"), ("checkpoint-0", images[1], "ok", "browser-test")]
    assert lab.proc.returncode is not None  # the server is gone
