"""The page at /, the docs at /docs and the OpenAPI document, in a real headless Chromium
(Debian's chromium and chromedriver, driven by selenium) against real processes.
"""
import json
import shutil
from urllib.parse import urlsplit

import pytest
import requests
from openapi_spec_validator import validate
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from serving.web.app import create_app
from conftest import distinct_images, tiny_settings


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1200,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request's URL
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    yield driver
    driver.quit()


@pytest.fixture
def url(service, tiny_model):
    service.worker(**tiny_settings(tiny_model))
    return service.web().url


def requested_urls(browser):
    """The URLs the browser has requested since the last call."""
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def assert_all_local(urls, base):
    """Every request went to the service (or stayed inside the page: data: and blob: URLs)."""
    origin = urlsplit(base).netloc
    away = [u for u in urls if urlsplit(u).scheme not in ("data", "blob")
            and urlsplit(u).netloc != origin]
    assert urls and not away, away


def wait_for(browser, css, count):
    WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, css)) >= count)
    return browser.find_elements(By.CSS_SELECTOR, css)


def test_page_classifies_dropped_images_and_shows_errors(browser, url, tmp_path):
    requested_urls(browser)
    browser.get(url + "/")
    for control in browser.find_elements(By.CSS_SELECTOR, "input"):  # each has a visible label
        label = browser.find_element(By.CSS_SELECTOR, f"label[for='{control.get_attribute('id')}']")
        assert label.text.strip()
    paths = []
    for n, data in enumerate(distinct_images(2)):
        paths.append(tmp_path / f"photo-{n}.png")
        paths[-1].write_bytes(data)
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in paths))

    cards = wait_for(browser, "#results .image .timing", 2)
    names = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#results .image h2")]
    assert sorted(names) == ["photo-0.png", "photo-1.png"]
    for card in browser.find_elements(By.CSS_SELECTOR, "#results .image"):
        rows = card.find_elements(By.CSS_SELECTOR, "ol li")
        assert len(rows) == 5 and all(row.text.startswith("class_") for row in rows)
        assert "batch of 2" in card.find_element(By.CSS_SELECTOR, ".timing").text
    assert len(cards) == 2
    assert browser.save_screenshot(str(tmp_path / "page.png"))
    status = browser.find_element(By.ID, "status").text  # what a screen reader announces
    assert status == "Done: 2 images classified.", status

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    browser.find_element(By.ID, "files").send_keys(str(text))
    error = wait_for(browser, "#results .image .error", 1)[0].text
    api = requests.post(f"{url}/predict", files={"image": ("notes.txt", b"not an image")})
    assert error == f"Error: {api.json()['error']}"
    assert browser.save_screenshot(str(tmp_path / "page-error.png"))
    assert_all_local(requested_urls(browser), url)


def test_docs_load_offline_and_list_every_operation(browser, url, tmp_path):
    document = requests.get(f"{url}/openapi.json").json()
    requested_urls(browser)
    browser.get(url + "/docs")
    operations = sum(len(item) for item in document["paths"].values())
    wait_for(browser, ".opblock", operations)
    assert browser.save_screenshot(str(tmp_path / "docs.png"))
    assert_all_local(requested_urls(browser), url)


def test_openapi_document_is_valid_and_names_every_route(service):
    document = requests.get(f"{service.web().url}/openapi.json").json()
    validate(document)
    for rule in create_app().url_map.iter_rules():
        path = rule.rule.replace("<", "{").replace(">", "}").replace("{path:", "{")
        assert path in document["paths"], path
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            operation = document["paths"][path][method.lower()]
            assert operation["responses"], (path, method)
            assert not operation["summary"].endswith(f"<{method}>"), (path, "no docstring")
