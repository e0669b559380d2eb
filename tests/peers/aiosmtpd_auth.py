#!/usr/bin/env python3
"""aiosmtpd requiring SMTP AUTH (PLAIN/LOGIN) over plain text, for the secrets test.

Like aiosmtpd_store.py (same storage: <seq>.eml + <seq>.json in DIR), but MAIL is refused
until the client has authenticated with --user/--password (535 on a wrong password). AUTH is
offered without TLS (auth_require_tls=False) so the worker's `tls = "off"` path is exercised.
Writes one line per AUTH attempt to DIR/../auth.log: "ok" or "fail" (never the credentials).

Usage: python3 aiosmtpd_auth.py --port P --dir D --user U --password W
"""
import argparse
import os
import signal
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aiosmtpd_store import Store  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    log = open(os.path.join(os.path.dirname(os.path.abspath(args.dir)), "auth.log"), "a")
    lock = threading.Lock()

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == args.user.encode()
            and auth_data.password == args.password.encode()
        )
        with lock:
            log.write("%s %s\n" % (mechanism, "ok" if ok else "fail"))
            log.flush()
        # handled=False: aiosmtpd then answers a failure with 535 itself
        return AuthResult(success=ok, handled=False)

    controller = Controller(
        Store(args.dir),
        hostname=args.host,
        port=args.port,
        enable_SMTPUTF8=True,
        decode_data=False,
        ready_timeout=10.0,
        authenticator=authenticator,
        auth_required=True,
        auth_require_tls=False,
    )
    controller.start()
    print("aiosmtpd (AUTH) listening on %s:%d" % (args.host, args.port), flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
