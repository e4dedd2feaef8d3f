import pytest

from common.redaction import redact_params, redact_url, without_credentials


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("http://alice:s3cret@host:5000/", "http://***@host:5000/"),
        ("https://t0ken@host/path@v1", "https://***@host/path@v1"),  # an @ in the path is no userinfo
        ("https://u:p@ss@host/", "https://***@host/"),  # the authority ends at its last @
        ("https://host/base/?token=abc&sig=x%3D", "https://host/base/?token=***&sig=***"),
        ("https://host/?t0ken#frag", "https://host/?***#frag"),
        ("file:///data/mirror/", "file:///data/mirror/"),
        ("models:/name@champion", "models:/name@champion"),
    ],
)
def test_redact_url_hides_userinfo_and_query_values(url, shown):
    assert redact_url(url) == shown


def test_links_lose_credentials_and_only_urls_are_redacted():
    assert without_credentials("https://alice:s3cret@host:5000/x") == "https://host:5000/x"
    params = {"mirror": "https://a:b@h/?k=v", "name": "user@example", "lr": 0.1, "classes": None}
    assert redact_params(params) == {
        "mirror": "https://***@h/?k=***",
        "name": "user@example",
        "lr": 0.1,
        "classes": None,
    }
