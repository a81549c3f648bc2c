"""QMP client for the guest-image scripts: one connection to a QEMU's QMP
socket, commands and human-monitor (HMP) commands, and HMP commands
pipelined in batches (thousands of `gva2gpa` a second).

Used by capture.py; no third-party modules.
"""

import json
import socket


class QmpError(Exception):
    """A QMP failure, naming the command and QEMU's answer."""


class Qmp:
    """A QMP session on a unix socket."""

    def __init__(self, path, timeout=120.0):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            raise QmpError("cannot connect to QMP socket %s: %s" % (path, e)) from e
        self.rfile = self.sock.makefile("rb")
        self.next_id = 0
        greeting = self._recv()
        if "QMP" not in greeting:
            raise QmpError("%s did not greet with QMP: %r" % (path, greeting))
        self.cmd("qmp_capabilities")

    def close(self):
        try:
            self.rfile.close()
        finally:
            self.sock.close()

    def _recv(self):
        while True:
            line = self.rfile.readline()
            if not line:
                raise QmpError("QMP connection %s closed by QEMU" % self.path)
            msg = json.loads(line)
            if "event" in msg:
                continue
            return msg

    def _send(self, name, args):
        self.next_id += 1
        req = {"execute": name, "id": self.next_id}
        if args:
            req["arguments"] = args
        self.sock.sendall((json.dumps(req) + "\n").encode())
        return self.next_id

    def _answer(self, name, want_id):
        r = self._recv()
        if r.get("id") != want_id:
            raise QmpError("QMP %s: answer %r out of order (wanted id %d)" % (name, r, want_id))
        if "error" in r:
            raise QmpError("QMP %s: %s" % (name, r["error"]))
        return r["return"]

    def cmd(self, name, **args):
        """Runs one QMP command and returns its `return` value."""
        return self._answer(name, self._send(name, args))

    def hmp(self, line):
        """Runs one HMP command and returns its text (LF line ends)."""
        text = self.cmd("human-monitor-command", **{"command-line": line})
        return text.replace("\r\n", "\n")

    def hmp_many(self, lines, window=64):
        """Runs HMP commands in order, at most `window` in flight, and
        returns their texts in the same order."""
        out = []
        pending = []
        it = iter(lines)
        done = False
        while True:
            while not done and len(pending) < window:
                try:
                    line = next(it)
                except StopIteration:
                    done = True
                    break
                pending.append((line, self._send("human-monitor-command", {"command-line": line})))
            if not pending:
                return out
            line, want = pending.pop(0)
            text = self._answer("human-monitor-command '%s'" % line, want)
            out.append(text.replace("\r\n", "\n"))
