"""Screenshot an HTML page with Debian's headless Chromium (used for docs/compare.png).

    .venv/bin/python scripts/screenshot_page.py PAGE.html OUT.png [--width 1400] [--height 2000]

Needs `chromium` and `chromium-driver` (scripts/install_chromium.sh) and selenium.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def chromium_driver(width: int = 1400, height: int = 1000):
    """A headless Chromium WebDriver on the distribution's binaries; browser console logged."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    binary = "/usr/lib/chromium/chromium" if Path("/usr/lib/chromium/chromium").exists() \
        else shutil.which("chromium")
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--hide-scrollbars", f"--window-size={width},{height}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=opts)


def wait_for_plots(driver, n: int, timeout: float = 60) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(
        "return document.querySelectorAll('.js-plotly-plot .main-svg').length") >= n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page")
    ap.add_argument("out")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=2000)
    args = ap.parse_args()
    driver = chromium_driver(args.width, args.height)
    try:
        driver.get(Path(args.page).resolve().as_uri())
        wait_for_plots(driver, 1)
        driver.save_screenshot(args.out)
    finally:
        driver.quit()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
