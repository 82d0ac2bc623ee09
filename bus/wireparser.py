"""nats-py's protocol parser with a cheaper path for MSG and HMSG: the same callback calls, in
the same order, with the same arguments; any other control line is left to nats-py's own code.
"""

from __future__ import annotations

from nats.protocol.parser import AWAITING_CONTROL_LINE, AWAITING_MSG_PAYLOAD, Parser

_CRLF = b"\r\n"
_SPACE = b" "
_MSG = b"MSG"
_HMSG = b"HMSG"
# nats-py's HMSG_RE tries first to read `HMSG subject sid a b` as having reply subject `a` and
# header size `b`, with its `\s+` running over the line end; that can only succeed when the byte
# after the line end is whitespace or a digit.
_WHITESPACE_OR_DIGIT = b" \t\n\r\x0b\x0c0123456789"

# `int(field)` for the sid and size fields, which repeat: a dict look-up costs a fifth of `int`.
_INTS: dict[bytes, int] = {}
_INTS_MAX = 4096


def _int(field: bytes) -> int:
    value = int(field)
    if len(_INTS) < _INTS_MAX:
        _INTS[field] = value
    return value


class WireParser(Parser):
    """`nats.protocol.parser.Parser` whose `parse` makes exactly the calls nats-py's would.

    Each read is parsed from one immutable `bytes` (the read itself, or the unconsumed bytes
    joined to it), so slices are single copies and `bytes.split` yields `bytes` fields. A MSG
    or HMSG line is taken here only in the shape the server sends (fields joined by single
    spaces); anything else, from that line on, goes to nats-py's `Parser.parse`.
    """

    async def parse(self, data: bytes = b"") -> None:
        buf: bytearray = self.buf
        if buf:
            if self.state == AWAITING_MSG_PAYLOAD and len(buf) + len(data) < self.needed + 2:
                buf += data
                return
            view = b"".join((buf, data))
            buf.clear()
        else:
            view = data if type(data) is bytes else bytes(data)
        # Invariant until the `finally`: the unconsumed bytes are view[pos:], and `buf` is empty.
        size = len(view)
        pos = 0
        delegate = False
        nc = self.nc
        # A client that can hand some messages over synchronously (`EdgebusNatsClient`'s
        # direct deliveries) spares them a coroutine each; the rest are awaited.
        deliver_now = getattr(nc, "deliver_now", None)
        try:
            if self.state == AWAITING_MSG_PAYLOAD:
                needed = self.needed
                if size < needed + 2:
                    return
                header_size = self.header_needed
                if header_size > 0:
                    hdr: bytes | None = view[:header_size]
                    payload = view[header_size:needed]
                    self.header_needed = 0
                else:
                    hdr = None
                    payload = view[:needed]
                pos = needed + 2
                self.state = AWAITING_CONTROL_LINE
                arg = self.msg_arg
                sid, subject, reply = arg["sid"], arg["subject"], arg["reply"]
                if deliver_now is None or not deliver_now(sid, subject, reply, payload, hdr):
                    await nc._process_msg(sid, subject, reply, payload, hdr)
                if self.buf is not buf:  # reset() while awaiting: this data is stale
                    return

            find = view.find
            join = _SPACE.join
            cached = _INTS.get
            while True:
                end = find(_CRLF, pos)
                if end < 0:
                    break
                line = view[pos:end]
                parts = line.split()
                nparts = len(parts)
                if nparts == 4:
                    op, subject, sid_field, size_field = parts
                    reply = header_field = b""
                    usable = op == _MSG
                elif nparts == 5:
                    op, subject, sid_field, field, size_field = parts
                    if op == _MSG:
                        reply = field
                        header_field = b""
                        usable = True
                    else:
                        reply = b""
                        header_field = field
                        usable = op == _HMSG and (
                            end + 2 == size or view[end + 2] not in _WHITESPACE_OR_DIGIT
                        )
                elif nparts == 6:
                    op, subject, sid_field, reply, header_field, size_field = parts
                    usable = op == _HMSG
                else:
                    delegate = True
                    break
                if not usable or join(parts) != line or not size_field.isdigit():
                    delegate = True
                    break
                try:
                    needed = cached(size_field) or _int(size_field)
                    sid = cached(sid_field) or _int(sid_field)
                    if header_field:
                        if not header_field.isdigit():
                            delegate = True
                            break
                        header_size = cached(header_field) or _int(header_field)
                    else:
                        header_size = 0
                except ValueError:  # nats-py raises ProtocolError("nats: malformed MSG")
                    delegate = True
                    break

                start = end + 2
                stop = start + needed
                if stop + 2 > size:
                    arg = self.msg_arg
                    arg["subject"] = subject
                    arg["sid"] = sid
                    arg["reply"] = reply
                    self.needed = needed
                    self.header_needed = header_size
                    self.state = AWAITING_MSG_PAYLOAD
                    pos = start
                    break
                if header_size:
                    hdr = view[start : start + header_size]
                    payload = view[start + header_size : stop]
                else:
                    hdr = None
                    payload = view[start:stop]
                pos = stop + 2
                if deliver_now is None or not deliver_now(sid, subject, reply, payload, hdr):
                    await nc._process_msg(sid, subject, reply, payload, hdr)
                if self.buf is not buf:  # reset() while awaiting
                    return
        finally:
            if pos < size and self.buf is buf:
                buf += memoryview(view)[pos:] if pos else view
        if delegate:
            await super().parse()
