# -*- test-case-name: tests.browser.test_dashboard_browser -*-
"""The master's dashboard driven in a real headless Chromium (Playwright)."""
