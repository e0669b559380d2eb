#!/usr/bin/env python3
"""A hostile or broken stand-in for `mta-worker`, started by the governor like the real one
(its end of the socketpair on fd 3). For tests/tests/hostile_worker.rs.

Environment:
  FAKE_MODE          what to do (below)
  FAKE_REAL_WORKER   path of the real mta-worker
  FAKE_PROTOCOL      the protocol version to announce in Hello
  FAKE_STATE         a directory; with FAKE_ONCE=1 only the first start misbehaves (it creates
                     FAKE_STATE/misbehaved), every later start execs the real worker on the same fd

Modes:
  exit            exit 1 at once, before any handshake
  garbage         handshake, then a frame whose payload is not a message
  huge            handshake, then a length prefix of 0xffffffff (4 GiB)
  unknown_variant handshake, then a frame with an enum variant no version defines
  stop_reading    handshake, take a job, shut down its reading side, defer the job (freeing a
                  session) so the governor's next job write fails with EPIPE; stay alive
  silent          handshake, then keep reading jobs and never answer any (a hung worker)
  foreign_outcome run the real worker behind a relay and, after its first outcome, inject
                  outcomes for a job id that was never leased and for the right job with a
                  wrong lease id, then forward the real outcome, then send it a second time.

Wire format (protocol crate): u32 big-endian length + postcard payload; postcard writes enum
variants and integers as LEB128 varints and strings as varint length + bytes.
"""
import os
import socket
import sys
import threading
import time

FD = 3


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf, i):
    shift = 0
    n = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def frame(payload):
    return len(payload).to_bytes(4, "big") + payload


def read_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def read_frame(sock):
    n = int.from_bytes(read_exact(sock, 4), "big")
    return read_exact(sock, n)


def hello(version, pid):
    # ToGovernor::Hello is variant 0: version, pid
    return frame(varint(0) + varint(version) + varint(pid))


def outcome_payload(job_id, lease_id, text=b"250 fake", kind=0, code=250):
    # ToGovernor::Outcome (variant 1) of JobOutcome { job_id, lease_id, kind (0 Delivered,
    # 1 Deferred), code, enhanced: None, text, stage: FinalDot (7), latency_ms: 1, session: 0 }
    return (
        varint(1)
        + varint(job_id)
        + varint(lease_id)
        + varint(kind)
        + varint(code)
        + b"\x00"
        + varint(len(text))
        + text
        + varint(7)
        + varint(1)
        + varint(0)
    )


def log(msg):
    sys.stderr.write("fake_worker pid=%d: %s\n" % (os.getpid(), msg))
    sys.stderr.flush()


def exec_real():
    real = os.environ["FAKE_REAL_WORKER"]
    os.execv(real, [real])


def handshake(sock):
    sock.sendall(hello(int(os.environ["FAKE_PROTOCOL"]), os.getpid()))
    welcome = read_frame(sock)
    if welcome[:1] != b"\x00":
        log("no welcome: %r" % welcome[:16])
        sys.exit(1)


def misbehave_then_wait(sock, data):
    handshake(sock)
    # Let the governor hand us jobs first, so the kill has jobs to requeue.
    time.sleep(0.3)
    log("sending %r" % data[:16])
    sock.sendall(data)
    # The governor must kill us; never exit on our own.
    while True:
        try:
            if not sock.recv(65536):
                break
        except OSError:
            break
    time.sleep(60)


def foreign_outcome():
    """Relay between the governor (fd 3) and a real worker, injecting outcomes."""
    up = socket.socket(fileno=FD)
    ours, theirs = socket.socketpair()
    real = os.environ["FAKE_REAL_WORKER"]
    pid = os.fork()
    if pid == 0:
        # The real worker gets its end of our socketpair on fd 3 (replacing the governor's).
        os.dup2(theirs.fileno(), FD)
        os.execv(real, [real])
    theirs.close()

    class Child:
        def kill(self):
            try:
                os.kill(pid, 9)
            except OSError:
                pass

        def wait(self):
            os.waitpid(pid, 0)

    child = Child()

    # governor -> worker
    def g2w():
        try:
            while True:
                ours.sendall(frame(read_frame(up)))
        except Exception:
            child.kill()
            os._exit(0)

    threading.Thread(target=g2w, daemon=True).start()
    injected = False
    try:
        while True:
            payload = read_frame(ours)
            if payload[:1] == b"\x01" and not injected:
                injected = True
                job_id, i = read_varint(payload, 1)
                lease_id, _ = read_varint(payload, i)
                log("real outcome for job %d lease %d: injecting" % (job_id, lease_id))
                up.sendall(frame(outcome_payload(job_id + 1_000_000, lease_id)))
                up.sendall(frame(outcome_payload(job_id, lease_id + 77)))
                up.sendall(frame(payload))
                up.sendall(frame(payload))
                continue
            up.sendall(frame(payload))
    except Exception:
        child.wait()
        os._exit(0)


def main():
    mode = os.environ.get("FAKE_MODE", "")
    state = os.environ.get("FAKE_STATE")
    if os.environ.get("FAKE_ONCE") == "1" and state:
        try:
            fd = os.open(os.path.join(state, "misbehaved"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
        except FileExistsError:
            exec_real()
    log("mode %s" % mode)
    if mode == "exit":
        sys.exit(1)
    if mode == "foreign_outcome":
        foreign_outcome()
        return
    sock = socket.socket(fileno=FD)
    if mode == "garbage":
        misbehave_then_wait(sock, frame(b"\xff" * 8))
    elif mode == "huge":
        misbehave_then_wait(sock, b"\xff\xff\xff\xff" + b"\x00" * 64)
    elif mode == "stop_reading":
        handshake(sock)
        # Wait for a job, stop reading, then free a session (a deferral, so the job is retried
        # elsewhere): the governor's next job write fails with EPIPE.
        while True:
            payload = read_frame(sock)
            if payload[:1] == b"\x03":
                job_id, i = read_varint(payload, 1)
                lease_id, _ = read_varint(payload, i)
                break
        sock.shutdown(socket.SHUT_RD)
        log("stopped reading; deferring job %d" % job_id)
        sock.sendall(frame(outcome_payload(job_id, lease_id, b"451 fake", kind=1, code=451)))
        time.sleep(60)
    elif mode == "silent":
        handshake(sock)
        log("silent: taking jobs, answering none")
        while True:
            try:
                read_frame(sock)
            except (EOFError, OSError):
                time.sleep(60)
    elif mode == "unknown_variant":
        misbehave_then_wait(sock, frame(b"\x63"))
    else:
        log("unknown FAKE_MODE %r" % mode)
        sys.exit(2)


if __name__ == "__main__":
    main()
