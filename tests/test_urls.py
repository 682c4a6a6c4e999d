"""URL normalisation: every spelling of one page maps to one string, different pages stay apart."""
import pytest

from data_pipeline import urls

SAME_PAGE = [
    "https://www.shop.example/products/item-1?id=1&ref=home",
    "http://www.shop.example/products/item-1?id=1&ref=home",  # scheme
    "HTTPS://WWW.Shop.EXAMPLE/products/item-1?id=1&ref=home",  # scheme and host case
    "https://www.shop.example:443/products/item-1?id=1&ref=home",  # default port
    "http://www.shop.example:80/products/item-1?id=1&ref=home",
    "https://www.shop.example/products/./item-1?id=1&ref=home",  # dot segments
    "https://www.shop.example/shop/../products/item-1?id=1&ref=home",
    "https://www.shop.example/products/item-1?id=1&ref=home#reviews",  # fragment
    "https://www.shop.example/products/item-1?ref=home&id=1",  # query order
    "https://www.shop.example/products/item-1?id=1&utm_source=fb&ref=home&utm_medium=email",  # tracking
    "https://www.shop.example/products/item-1?gclid=abc&id=1&fbclid=x&ref=home",
    "https://www.shop.example./products/item-1?id=1&ref=home",  # trailing dot of the host
    "https://www.shop.example/products/item%2D1?id=1&ref=home",  # escaped unreserved character
    "  https://www.shop.example/products/item-1?id=1&ref=home  ",
]


def test_all_spellings_of_a_page_normalise_to_one():
  expected = "https://www.shop.example/products/item-1?id=1&ref=home"
  assert {urls.normalize_url(u) for u in SAME_PAGE} == {expected}


@pytest.mark.parametrize("url,expected", [
    ("https://www.bücher.example/a", "https://www.xn--bcher-kva.example/a"),  # IDN -> punycode
    ("https://www.xn--bcher-kva.example/a", "https://www.xn--bcher-kva.example/a"),
    ("https://www.café.example/", "https://www.xn--caf-dma.example/"),
    ("https://a.example", "https://a.example/"),  # empty path
    ("https://a.example:8080/x", "https://a.example:8080/x"),  # a non-default port is kept
    ("https://a.example/a/b/../../../x", "https://a.example/x"),  # never above the root
    ("https://a.example/a/b/.", "https://a.example/a/b/"),
    ("https://user:pw@a.example/x", "https://a.example/x"),  # credentials never enter a key
    ("https://a.example/x?utm_source=a", "https://a.example/x"),  # only tracking: no query
    ("https://a.example/x?b=2&a=1&a=0", "https://a.example/x?a=0&a=1&b=2"),
    ("https://a.example/a b", "https://a.example/a%20b"),
    ("https://a.example/%7euser", "https://a.example/~user"),
    ("https://a.example/%2f", "https://a.example/%2F"),  # reserved escapes stay, upper-cased
    ("//a.example/x", "https://a.example/x"),
    ("a.example/x", "https://a.example/x"),
])
def test_normalise_cases(url, expected):
  assert urls.normalize_url(url) == expected


def test_different_pages_stay_apart():
  pages = ["https://a.example/x", "https://a.example/y", "https://b.example/x", "https://a.example/x?id=2",
           "https://a.example:8080/x", "https://a.example/X"]
  assert len({urls.normalize_url(u) for u in pages}) == len(pages)


def test_scheme_kept_when_asked():
  assert urls.normalize_url("http://a.example/", unify_scheme=False) == "http://a.example/"


@pytest.mark.parametrize("bad", ["", "   ", "ftp://a.example/x", "mailto:someone@a.example", "https://", "http://:80/",
                                 "https://a.example:99999/"])
def test_bad_urls_raise_value_error(bad):
  with pytest.raises(ValueError):
    urls.normalize_url(bad)


def test_cluster_key_prefers_the_page_url():
  key = urls.cluster_key("HTTP://Shop.example/p?utm_source=x", "https://img.example/a/b/01.jpg")
  assert key == urls.ClusterKey("https://shop.example/p", "page_url")


def test_cluster_key_falls_back_to_image_host_and_directory():
  for page in (None, "", "ftp://nope/"):
    key = urls.cluster_key(page, "http://IMG.example:80/products/item-7/03.jpg?w=200#x")
    assert key == urls.ClusterKey("https://img.example/products/item-7/", "image_dir")
  a = urls.cluster_key(None, "https://img.example/products/item-7/01.jpg")
  b = urls.cluster_key(None, "https://img.example/products/item-8/01.jpg")
  assert a.key != b.key


def test_cluster_key_without_any_usable_url_raises():
  with pytest.raises(ValueError):
    urls.cluster_key(None, "not a url at all://")
