#!/usr/bin/env python3
"""Independent DKIM verification of a stored message with dkimpy.

usage: dkim_verify.py MESSAGE SELECTOR DOMAIN PUBLIC_TXT
PUBLIC_TXT is the DNS TXT record content (`v=DKIM1; k=...; p=...`), served to dkimpy through
its dnsfunc hook so no DNS is needed. Prints `PASS` or `FAIL <reason>`; exit 0 on pass.
"""

import sys

import dkim


def main():
    path, selector, domain, txt = sys.argv[1:5]
    with open(path, "rb") as f:
        message = f.read()
    want = f"{selector}._domainkey.{domain}.".encode()

    def dnsfunc(name, timeout=5):
        if name.rstrip(b".") == want.rstrip(b"."):
            return txt.encode()
        return None

    d = dkim.DKIM(message)
    try:
        ok = d.verify(dnsfunc=dnsfunc)
    except dkim.DKIMException as e:
        print(f"FAIL {e}")
        sys.exit(1)
    if ok:
        print("PASS")
        sys.exit(0)
    print("FAIL signature did not verify")
    sys.exit(1)


if __name__ == "__main__":
    main()
