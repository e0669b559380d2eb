#!/usr/bin/env python3
"""Parse stored messages with Python's own `email` package, an implementation independent of the
governor, and print one JSON object per file (in argument order) on stdout:

  {"file", "headers": [[name, decoded value], ...], "addresses": {lower name: [[display, addr_spec], ...]},
   "body": decoded text of a non-multipart message or null, "defects": [...], "errors": [...]}

Header values are decoded (RFC 2047) and unfolded; the body is decoded from its
Content-Transfer-Encoding and charset, line endings as "\n".

Usage: python3 mailparse.py FILE...
"""
import json
import sys
from email import policy
from email.header import decode_header, make_header
from email.parser import BytesParser
from email.utils import getaddresses


def clean(s):
    """Header text from 8-bit bytes carries surrogate escapes: turn them back into UTF-8 text."""
    if not isinstance(s, str):
        return s
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def display_names(raw, count):
    """Display names decoded per RFC 2047 section 6.2 (white space between adjacent encoded-words
    is dropped). Python's structured-header parser keeps that white space inside a phrase, so the
    names are decoded here from the raw value instead; None if the raw parse disagrees."""
    unfolded = raw.replace("\r\n", "").replace("\n", "")
    pairs = getaddresses([unfolded])
    if len(pairs) != count:
        return None
    return [clean(str(make_header(decode_header(name)))) for name, _ in pairs]


def parse(path):
    with open(path, "rb") as f:
        data = f.read()
    out = {"file": path, "headers": [], "addresses": {}, "body": None, "defects": [], "errors": []}
    try:
        msg = BytesParser(policy=policy.default).parsebytes(data)
    except Exception as e:  # noqa: BLE001 - report, never crash the harness
        out["errors"].append("parse: %r" % (e,))
        return out
    out["defects"] = [repr(d) for d in msg.defects]
    for name, _raw in msg.raw_items():
        try:
            values = msg.get_all(name) or []
        except Exception as e:  # noqa: BLE001
            out["errors"].append("header %s: %r" % (name, e))
            continue
        # raw_items yields one entry per occurrence; get_all returns them all, so record once.
        if any(h[0].lower() == name.lower() for h in out["headers"]):
            continue
        for v in values:
            try:
                out["headers"].append([name, clean(str(v))])
                for d in getattr(v, "defects", []):
                    out["defects"].append("%s: %r" % (name, d))
                addrs = getattr(v, "addresses", None)
                if addrs is not None:
                    names = display_names(_raw, len(addrs)) or [a.display_name for a in addrs]
                    out["addresses"].setdefault(name.lower(), []).extend(
                        [clean(n), clean(a.addr_spec)] for n, a in zip(names, addrs)
                    )
            except Exception as e:  # noqa: BLE001
                out["errors"].append("header %s: %r" % (name, e))
    if not msg.is_multipart():
        try:
            body = msg.get_content()
            if isinstance(body, bytes):
                body = body.decode("utf-8", errors="replace")
            out["body"] = clean(body).replace("\r\n", "\n")
        except Exception as e:  # noqa: BLE001
            out["errors"].append("body: %r" % (e,))
    return out


def main():
    for path in sys.argv[1:]:
        print(json.dumps(parse(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
