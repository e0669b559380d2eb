#!/usr/bin/env python3
"""An independent SMTP receiver for the integration tests (Python aiosmtpd).

Listens on 127.0.0.1:PORT with SMTPUTF8 and 8BITMIME offered and stores every accepted message
in DIR as two files:
  <seq>.eml   the message exactly as received (after dot-unstuffing: envelope.original_content)
  <seq>.json  {"seq", "mail_from", "rcpt_tos", "mail_options", "rcpt_options", "smtp_utf8", "bytes"}
The .json file is written last and both are renamed into place, so every .json names a complete
.eml. Runs until killed (SIGTERM/SIGINT exit cleanly).

Usage: python3 aiosmtpd_store.py --port P --dir D [--host 127.0.0.1]
"""
import argparse
import itertools
import json
import os
import signal
import sys
import threading

from aiosmtpd.controller import Controller


class Store:
    def __init__(self, directory):
        self.dir = directory
        self.seq = itertools.count(1)
        self.lock = threading.Lock()

    def _put(self, name, data):
        tmp = os.path.join(self.dir, "." + name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, os.path.join(self.dir, name))

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            seq = next(self.seq)
        data = envelope.original_content or b""
        meta = {
            "seq": seq,
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "mail_options": list(envelope.mail_options),
            "rcpt_options": list(envelope.rcpt_options),
            "smtp_utf8": bool(getattr(envelope, "smtp_utf8", False)),
            "bytes": len(data),
        }
        self._put("%d.eml" % seq, data)
        self._put("%d.json" % seq, json.dumps(meta).encode("utf-8"))
        return "250 2.0.0 Ok: queued as %d" % seq


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    controller = Controller(
        Store(args.dir),
        hostname=args.host,
        port=args.port,
        enable_SMTPUTF8=True,
        decode_data=False,
        ready_timeout=10.0,
    )
    controller.start()
    print("aiosmtpd listening on %s:%d" % (args.host, args.port), flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
