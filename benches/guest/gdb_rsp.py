"""A small GDB remote-serial-protocol client for QEMU's gdbstub: reads the
target description (`qXfer:features:read`, following its xi:includes) to
number the registers by name, reads them (`p`) and writes them (`P`).

The guest must already be stopped (QMP `stop`); connecting stops it anyway.
The client never sends `D` (detach resumes the guest) or `c`.
"""

import socket
import xml.etree.ElementTree as ET

XINCLUDE = ("{http://www.w3.org/2001/XInclude}include", "xi-include")


class GdbError(Exception):
    """A gdbstub failure, naming the packet and the answer."""


class Register:
    """One register of the target description."""

    def __init__(self, name, regnum, bitsize, feature):
        self.name = name
        self.regnum = regnum
        self.bitsize = bitsize
        self.feature = feature


class Gdb:
    """A session with QEMU's gdbstub on a unix socket or host:port."""

    def __init__(self, address, timeout=60.0):
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(address)
        except OSError as e:
            raise GdbError("cannot connect to the gdbstub at %s: %s" % (address, e)) from e
        self.buf = b""
        self.acks = True
        self.sock.sendall(b"+")
        self.supported = self.request("qSupported:xmlRegisters=aarch64,riscv")
        if "qXfer:features:read+" not in self.supported:
            raise GdbError("the gdbstub offers no target description (qSupported: %s)" % self.supported)
        if "QStartNoAckMode+" in self.supported and self.request("QStartNoAckMode") == "OK":
            self.acks = False
        self.request("?")
        self.regs = self._describe()
        self.by_name = {}
        for r in self.regs:
            self.by_name.setdefault(r.name, r)

    def close(self):
        self.sock.close()

    # -- framing --

    def _byte(self):
        if not self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise GdbError("the gdbstub closed the connection")
            self.buf = chunk
        b, self.buf = self.buf[:1], self.buf[1:]
        return b

    def request(self, data):
        """Sends one packet and returns the reply's payload (decoded)."""
        payload = data.encode("latin-1")
        frame = b"$" + payload + b"#" + ("%02x" % (sum(payload) & 0xFF)).encode()
        for _ in range(3):
            self.sock.sendall(frame)
            if not self.acks:
                break
            b = self._byte()
            while b not in (b"+", b"-"):
                b = self._byte()
            if b == b"+":
                break
        else:
            raise GdbError("packet %r not acknowledged" % data[:40])
        while self._byte() != b"$":
            pass
        body = bytearray()
        while True:
            b = self._byte()
            if b == b"#":
                break
            body += b
        self._byte()
        self._byte()
        if self.acks:
            self.sock.sendall(b"+")
        return _unescape(bytes(body)).decode("latin-1")

    # -- target description --

    def _xfer(self, annex):
        out = ""
        offset = 0
        while True:
            r = self.request("qXfer:features:read:%s:%x,%x" % (annex, offset, 0x3F00))
            if not r or r[0] not in "ml":
                raise GdbError("qXfer:features:read:%s failed: %r" % (annex, r[:80]))
            out += r[1:]
            offset += len(r) - 1
            if r[0] == "l":
                return out

    def _describe(self):
        regs = []
        state = {"next": 0}

        def walk(annex, feature):
            try:
                # QEMU's target.xml uses the xi: prefix without declaring it.
                text = self._xfer(annex)
                if "xmlns:xi" not in text:
                    text = text.replace("<xi:include", "<xi-include")
                root = ET.fromstring(text)
            except ET.ParseError as e:
                raise GdbError("target description %s does not parse: %s" % (annex, e)) from e
            if root.tag == "feature":
                feature = root.get("name", feature)
            visit(root, feature)

        def visit(node, feature):
            for child in node:
                if child.tag in XINCLUDE:
                    walk(child.get("href"), feature)
                elif child.tag == "feature":
                    visit(child, child.get("name", feature))
                elif child.tag == "reg":
                    n = child.get("regnum")
                    regnum = int(n) if n is not None else state["next"]
                    state["next"] = regnum + 1
                    regs.append(Register(child.get("name"), regnum,
                                         int(child.get("bitsize", "64")), feature))
                else:
                    visit(child, feature)

        walk("target.xml", "")
        if not regs:
            raise GdbError("the target description lists no registers")
        return regs

    # -- registers --

    def read(self, reg):
        """A register's value (little-endian target), or None if the stub
        cannot read it."""
        r = self.request("p%x" % reg.regnum)
        if not r or r.startswith("E") or len(r) % 2:
            return None
        try:
            return int.from_bytes(bytes.fromhex(r), "little")
        except ValueError:
            return None

    def read_name(self, *names):
        """The first of `names` the target has, as (name, value)."""
        for n in names:
            r = self.by_name.get(n)
            if r is not None:
                v = self.read(r)
                if v is not None:
                    return n, v
        raise GdbError("none of the registers %s can be read from the gdbstub" % ", ".join(names))

    def write(self, reg, value):
        nbytes = (reg.bitsize + 7) // 8
        r = self.request("P%x=%s" % (reg.regnum, value.to_bytes(nbytes, "little").hex()))
        if r != "OK":
            raise GdbError("writing %s (P%x) failed: %r" % (reg.name, reg.regnum, r))

    def write_name(self, name, value):
        r = self.by_name.get(name)
        if r is None:
            raise GdbError("the target has no register %s" % name)
        self.write(r, value)


def _unescape(body):
    """Undoes RSP binary escaping (`}` x^0x20) and run-length encoding."""
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c == 0x7D and i + 1 < len(body):
            out.append(body[i + 1] ^ 0x20)
            i += 2
        elif c == 0x2A and out and i + 1 < len(body):
            out += bytes([out[-1]]) * (body[i + 1] - 29)
            i += 2
        else:
            out.append(c)
            i += 1
    return bytes(out)
