"""Headless chromium for the console's browser tests (Debian's chromium and chromedriver, installed by
hack/setup.sh, driven by Selenium): one set-up for tests/console/test_browser.py (fake cluster) and
tests/console/test_console_cluster.py (the local cluster)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1400, 1000)


@contextmanager
def chromium() -> Iterator[object]:
    """A headless chromium WebDriver, quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def log_in(driver, url: str, token: str, wait) -> None:
    """Through the login form, then wait for the runs table."""
    from selenium.webdriver.common.by import By

    driver.get(url + "/login")
    driver.find_element(By.NAME, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form button").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.run"))


def press_and_wait_for_count(driver, wait, keys: list[tuple[str, int]]) -> None:
    """Press each labelling key and wait until the page says that many labels were saved."""
    from selenium.webdriver.common.by import By

    body = driver.find_element(By.TAG_NAME, "body")
    for key, saved in keys:
        body.send_keys(key)
        wait.until(lambda d, n=saved: f"{n} labels so far" in d.find_element(By.ID, "label-progress").text)
