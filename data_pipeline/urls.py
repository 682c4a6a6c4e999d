"""URL normalisation: one spelling per web page, so that images of one page land in one cluster.

Pages are reached by many spellings (http vs https, host case, default ports, `./` and `../` segments,
fragments, utm_ tracking parameters, query order, Unicode hosts). `normalize_url` maps them to one string;
`cluster_key` picks the page URL of a sample, or, when the crawl did not record it (LAION, COYO and
DataComp carry only the image URL), the image URL's host plus directory.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
# Parameters that identify a click or a campaign, never the page.
TRACKING_PARAMS = frozenset({
    "gclid", "dclid", "fbclid", "msclkid", "yclid", "igshid", "mc_cid", "mc_eid", "_ga", "_gl",
    "ref_src", "spm", "si", "trk",
})
TRACKING_PREFIXES = ("utm_",)
# RFC 3986 unreserved characters: percent-encoding them changes nothing, so decode them.
_UNRESERVED = "-._~"
_PCT = re.compile(r"%[0-9A-Fa-f]{2}")
_OTHER_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:(?!\d)")  # "mailto:x", not "host:8080/x"


@dataclass(frozen=True)
class ClusterKey:
  """The grouping key of a sample and where it came from ("page_url" or "image_dir")."""
  key: str
  source: str


def _remove_dot_segments(path: str) -> str:
  """RFC 3986 section 5.2.4: resolves `.` and `..` segments (never climbs above the root)."""
  segments = path.split("/")
  out: list[str] = []
  for i, seg in enumerate(segments):
    last = i == len(segments) - 1
    if seg == ".":
      if last:
        out.append("")
      continue
    if seg == "..":
      if len(out) > 1:
        out.pop()
      if last:
        out.append("")
      continue
    out.append(seg)
  result = "/".join(out)
  if path.startswith("/") and not result.startswith("/"):
    result = "/" + result
  return result


def _normalize_percent(text: str, safe: str) -> str:
  """Decodes percent-escapes of unreserved characters, upper-cases the others, encodes raw unsafe bytes."""
  def fix(match: re.Match) -> str:
    char = chr(int(match.group(0)[1:], 16))
    if char.isascii() and (char.isalnum() or char in _UNRESERVED):
      return char
    return match.group(0).upper()
  text = _PCT.sub(fix, text)
  # Characters that should have been escaped (spaces, non-ASCII) are escaped; existing escapes stay.
  return quote(text, safe=safe + "%")


def _normalize_host(host: str) -> str:
  host = unquote(host).strip().rstrip(".").lower()
  if not host:
    raise ValueError("URL has no host")
  if host.startswith("["):  # IPv6 literal
    return host
  try:
    return host.encode("idna").decode("ascii")  # IDN -> punycode: one spelling per host
  except UnicodeError as e:
    raise ValueError(f"bad host name {host!r}") from e


def _is_tracking(name: str) -> bool:
  lowered = name.lower()
  return lowered in TRACKING_PARAMS or lowered.startswith(TRACKING_PREFIXES)


def normalize_url(url: str, unify_scheme: bool = True) -> str:
  """Returns one canonical spelling of a web URL; raises ValueError when `url` is not an http(s) URL.

  Lower-cases scheme and host, encodes IDN hosts as punycode, drops default ports, user info and the
  fragment, resolves dot segments, normalises percent-escapes, drops tracking parameters and sorts the
  query. With `unify_scheme`, http and https spell the same page (sites serve both).
  """
  if not isinstance(url, str) or not url.strip():
    raise ValueError("empty URL")
  text = url.strip()
  if text.startswith("//"):
    text = "http:" + text
  elif "://" not in text:
    if _OTHER_SCHEME.match(text):
      raise ValueError(f"not an http(s) URL: {url!r}")
    text = "http://" + text  # "example.com/page": crawls sometimes drop the scheme
  try:
    parts = urlsplit(text)
    port = parts.port
  except ValueError as e:
    raise ValueError(f"bad URL {url!r}: {e}") from e
  scheme = parts.scheme.lower()
  if scheme not in DEFAULT_PORTS:
    raise ValueError(f"not an http(s) URL: {url!r}")
  host = _normalize_host(parts.hostname or "")
  if port is not None and port != DEFAULT_PORTS[scheme]:
    host = f"{host}:{port}"
  if unify_scheme:
    scheme = "https"
  path = _normalize_percent(parts.path or "/", safe="/:@!$&'()*+,;=")
  path = _remove_dot_segments(path) or "/"
  params = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not _is_tracking(k)]
  query = urlencode(sorted(params), quote_via=quote, safe="/:@!$'()*,;")
  return urlunsplit((scheme, host, path, query, ""))


def image_directory(image_url: str) -> str:
  """The normalised image URL's host plus directory (no file name, no query): the fallback page key."""
  normal = normalize_url(image_url)
  parts = urlsplit(normal)
  directory = parts.path[: parts.path.rfind("/") + 1] or "/"
  return urlunsplit((parts.scheme, parts.netloc, directory, "", ""))


def cluster_key(page_url: str | None, image_url: str) -> ClusterKey:
  """The key that groups a sample: its normalised page URL, else its image URL's host + directory.

  Raises ValueError when neither URL is usable.
  """
  if page_url:
    try:
      return ClusterKey(normalize_url(page_url), "page_url")
    except ValueError:
      pass  # an unusable page URL is as good as none: fall back to the image URL
  return ClusterKey(image_directory(image_url), "image_dir")
