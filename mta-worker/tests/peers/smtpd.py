#!/usr/bin/env python3
"""A real SMTP receiver for the mta-worker tests, built on aiosmtpd.

Listens on 127.0.0.1 (a free port chosen by the kernel), prints `PORT <n>` on stdout once it
accepts connections, and stores every message it accepts in --dir:
  msg-<n>.eml   the bytes after DATA exactly as received (dot-stuffing removed, CRLF kept)
  msg-<n>.json  envelope: mail_from, rcpt_tos, mail_options, tls, auth (the login, if any)
  events.jsonl  one JSON line per AUTH command: whether the connection was encrypted then
Runs until killed (the tests kill it) or until stdin closes.
"""

import argparse
import asyncio
import json
import os
import socket
import ssl
import sys
import threading

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--starttls", action="store_true", help="offer STARTTLS")
    p.add_argument("--require-starttls", action="store_true")
    p.add_argument("--implicit-tls", action="store_true", help="TLS from the first byte")
    p.add_argument("--auth", help="user:password accepted by AUTH")
    p.add_argument("--no-8bitmime", action="store_true", help="do not offer 8BITMIME")
    p.add_argument("--smtputf8", action="store_true", help="offer SMTPUTF8")
    return p.parse_args()


class Handler:
    def __init__(self, args):
        self.args = args
        self.count = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.args.no_8bitmime:
            responses = [r for r in responses if "8BITMIME" not in r]
        return responses

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        base = os.path.join(self.args.dir, f"msg-{self.count}")
        with open(base + ".eml", "wb") as f:
            f.write(envelope.original_content)
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "mail_options": envelope.mail_options,
            "tls": server.transport.get_extra_info("sslcontext") is not None
            or session.ssl is not None,
            "auth": session.auth_data.login.decode()
            if isinstance(session.auth_data, LoginPassword)
            else None,
        }
        with open(base + ".json.tmp", "w") as f:
            json.dump(meta, f)
        # The tests poll for the .json: write it last and atomically.
        os.rename(base + ".json.tmp", base + ".json")
        return f"250 2.0.0 Ok: queued as {self.count}"


class Recording(SMTP):
    """Records, for every AUTH command, whether the connection was encrypted."""

    async def smtp_AUTH(self, arg):
        tls = self._tls_protocol is not None or (
            self.transport is not None
            and self.transport.get_extra_info("sslcontext") is not None
        )
        with open(os.path.join(self.event_dir, "events.jsonl"), "a") as f:
            mechanism = arg.split()[0].upper() if arg else ""
            f.write(json.dumps({"cmd": "AUTH", "mechanism": mechanism, "tls": tls}) + "\n")
        return await super().smtp_AUTH(arg)


def main():
    args = parse_args()
    ctx = None
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
    user, password = (args.auth.split(":", 1) if args.auth else (None, None))

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == user
            and auth_data.password.decode() == password
        )
        # handled=False: aiosmtpd answers a failure with 535 itself.
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    handler = Handler(args)

    def factory():
        s = Recording(
            handler,
            hostname="sink.test",
            decode_data=False,
            enable_SMTPUTF8=args.smtputf8,
            tls_context=ctx if (args.starttls or args.require_starttls) else None,
            require_starttls=args.require_starttls,
            authenticator=authenticator if args.auth else None,
            # With implicit TLS the whole connection is encrypted; aiosmtpd only knows about
            # STARTTLS, so it would otherwise refuse AUTH there.
            auth_require_tls=not args.implicit_tls,
        )
        s.event_dir = args.dir
        return s

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = loop.run_until_complete(
        loop.create_server(factory, sock=sock, ssl=ctx if args.implicit_tls else None)
    )
    print(f"PORT {sock.getsockname()[1]}", flush=True)

    # Exit when the test that started us goes away (stdin closes), even if it cannot kill us.
    def watch_stdin():
        sys.stdin.read()
        loop.call_soon_threadsafe(loop.stop)

    threading.Thread(target=watch_stdin, daemon=True).start()
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
