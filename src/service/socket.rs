//! Framed messages with their fds over a Unix stream socket: one
//! `sendmsg` carries a frame's fds (SCM_RIGHTS) on its first byte, and the
//! receiver hands each frame back with exactly the fds that came with it.
//! Owns the socket calls and the receive buffer; the byte layout is
//! `wire`'s. Every fd received is owned at once, so no error path leaks one.

use std::{
    collections::VecDeque,
    io,
    mem::{size_of, MaybeUninit},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    sync::{Arc, Mutex},
    time::Duration,
};

use super::wire::{decode, encode, Message, WireError};

/// Most fds one `recvmsg` accepts; a peer sending more gets `MSG_CTRUNC`
/// (the kernel closes the rest) and the connection fails.
const MAX_FDS: usize = 4;
/// Most fds any message travels with (`Hello`).
const MAX_MESSAGE_FDS: usize = 3;
/// Bytes of SCM_RIGHTS data for [`MAX_FDS`] fds.
#[allow(clippy::cast_possible_truncation)] // 16
const FDS_PAYLOAD: u32 = (size_of::<RawFd>() * MAX_FDS) as u32;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 << 10;

/// Who is at the other end of a connection (SO_PEERCRED: the credentials
/// the peer had when it connected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// One end of a service connection. After any error but a read timeout
/// the stream's framing is lost: drop the connection.
///
/// Any number of threads may send, through one `Conn` or its clones: a
/// frame goes out whole under a lock the clones share. Receive through one
/// handle only (each clone buffers on its own).
#[derive(Debug)]
pub struct Conn {
    stream: UnixStream,
    /// Held for a whole frame, so frames from several senders never
    /// interleave (a large one takes several writes).
    send_lock: Arc<Mutex<()>>,
    /// Bytes read and not yet decoded; `buf[0]` is stream byte `base`.
    buf: Vec<u8>,
    base: u64,
    /// Fds received, each with the stream offset of the last byte of the
    /// read that brought them. The kernel ends a read right after the data
    /// an SCM_RIGHTS message came with, and a sender puts a frame's fds on
    /// its first byte, so they belong to the frame holding that byte.
    fds: VecDeque<(u64, Vec<OwnedFd>)>,
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> WireError {
    move |source| WireError::Io { op, source }
}

impl Conn {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> Self {
        Conn {
            stream,
            send_lock: Arc::new(Mutex::new(())),
            buf: Vec::new(),
            base: 0,
            fds: VecDeque::new(),
        }
    }

    /// The stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends one message with its fds (as many as [`Message::fd_count`]).
    /// The message is validated first, so nothing the peer would reject
    /// leaves; a dead peer is an error (`EPIPE`), never SIGPIPE.
    pub fn send(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
        if fds.len() != msg.fd_count() {
            return Err(WireError::FdCount {
                kind_name: msg.kind_name(),
                want: msg.fd_count(),
                got: fds.len(),
            });
        }
        msg.validate()?;
        let mut frame = Vec::new();
        encode(msg, &mut frame);
        // A sender that panicked mid-frame left the stream broken either
        // way; the next send goes on and the peer sees the damage.
        let _whole_frame = self
            .send_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut sent = 0;
        if !fds.is_empty() {
            sent = loop {
                match self.sendmsg_fds(&frame, fds) {
                    Ok(n) => break n,
                    // Nothing was sent: the fds go again with the first byte.
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_err("sendmsg (frame with fds)")(e)),
                }
            };
        }
        while sent < frame.len() {
            let rest = &frame[sent..];
            // SAFETY:
            // 1. The fd is our open socket for the call.
            // 2. `rest` is valid for reads of `rest.len()` bytes.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_err("send")(e));
            }
            // `n` is at most `rest.len()`.
            sent += n.unsigned_abs();
        }
        Ok(())
    }

    /// One `sendmsg` of `frame` with `fds` attached; returns the bytes sent.
    fn sendmsg_fds(&self, frame: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let payload = size_of::<RawFd>() * raw.len();
        let payload_u32 = u32::try_from(payload)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many fds"))?;
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(payload_u32) } as usize;
        // u64 elements keep the buffer aligned for `cmsghdr`.
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: frame.as_ptr().cast_mut().cast(),
            iov_len: frame.len(),
        };
        // SAFETY: msghdr is plain data; all zeros is a valid (empty) value.
        let mut hdr: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = space;
        // Why the block below is sound:
        // 1. `hdr.msg_control` points at `space` zeroed, 8-aligned bytes,
        //    enough for one header (CMSG_SPACE), so CMSG_FIRSTHDR is
        //    non-null and in bounds.
        // 2. CMSG_DATA of that header has room for `payload` bytes
        //    (CMSG_SPACE(payload) counts them), and `raw` holds exactly
        //    `payload` bytes; the copy is unaligned-safe (byte copy).
        // SAFETY: by the points above.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&hdr);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload_u32) as usize;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload,
            );
        }
        // Why the block below is sound:
        // 1. The fd is our open socket.
        // 2. `hdr` points at `iov` (over `frame`, read only by the kernel)
        //    and at `control`, all alive for the call; the fds in it are
        //    open for the call (borrowed).
        // SAFETY: by the points above.
        let n = unsafe { libc::sendmsg(self.stream.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n.unsigned_abs())
    }

    /// Receives the next message with the fds that came with it:
    /// `Ok(None)` when the peer closed the connection between frames. A
    /// close mid-frame is `WireError::Io` with `UnexpectedEof`; a frame that
    /// came with another number of fds than its kind travels with is
    /// `WireError::FdCount` (the fds are closed).
    pub fn recv(&mut self) -> Result<Option<(Message, Vec<OwnedFd>)>, WireError> {
        loop {
            if let Some((msg, n)) = decode(&self.buf)? {
                let end = self.base + n as u64;
                let mut fds = Vec::new();
                while self.fds.front().is_some_and(|&(at, _)| at < end) {
                    if let Some((_, batch)) = self.fds.pop_front() {
                        fds.extend(batch);
                    }
                }
                self.buf.drain(..n);
                self.base = end;
                // A frame of up to MAX_FRAME passed: keep no megabyte per
                // idle connection.
                if self.buf.capacity() > 4 * READ_CHUNK && self.buf.len() < READ_CHUNK {
                    self.buf.shrink_to(2 * READ_CHUNK);
                }
                if fds.len() != msg.fd_count() {
                    return Err(WireError::FdCount {
                        kind_name: msg.kind_name(),
                        want: msg.fd_count(),
                        got: fds.len(),
                    });
                }
                return Ok(Some((msg, fds)));
            }
            if self.read_more()? == 0 {
                if self.buf.is_empty() && self.fds.is_empty() {
                    return Ok(None);
                }
                return Err(io_err("recv")(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "peer closed the connection mid-frame ({} bytes buffered)",
                        self.buf.len()
                    ),
                )));
            }
        }
    }

    /// One `recvmsg` appending to the buffer, queueing any fds that came;
    /// returns the bytes read (0 at EOF).
    fn read_more(&mut self) -> Result<usize, WireError> {
        // `recv` reads only when no whole frame is buffered, so every fd
        // still queued belongs to the frame not yet complete: more than any
        // message carries is a peer hoarding our fd table.
        let queued: usize = self.fds.iter().map(|(_, b)| b.len()).sum();
        if queued > MAX_MESSAGE_FDS {
            return Err(io_err("recvmsg")(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "peer sent {queued} fds with one unfinished frame (at most {MAX_MESSAGE_FDS})"
                ),
            )));
        }
        self.buf.reserve(READ_CHUNK);
        let from = self.buf.len();
        // 8-aligned, and room for CMSG_SPACE of MAX_FDS fds (32 bytes).
        let mut control = [0u64; 8];
        // SAFETY: CMSG_SPACE only computes a size.
        let space = (unsafe { libc::CMSG_SPACE(FDS_PAYLOAD) } as usize).min(size_of_val(&control));
        let spare = self.buf.spare_capacity_mut();
        let mut iov = libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: spare.len(),
        };
        loop {
            // SAFETY: msghdr is plain data; all zeros is a valid value.
            let mut hdr: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
            hdr.msg_iov = &mut iov;
            hdr.msg_iovlen = 1;
            hdr.msg_control = control.as_mut_ptr().cast();
            hdr.msg_controllen = space;
            // Why the block below is sound:
            // 1. The fd is our open socket.
            // 2. `iov` covers the buffer's spare capacity, writable and
            //    alive for the call; `control` holds `space` writable bytes.
            // SAFETY: by the points above.
            let n =
                unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_err("recvmsg")(e));
            }
            let n = n.unsigned_abs();
            // Why the block below is sound:
            // 1. `from + n` is within the capacity: the kernel wrote at most
            //    `iov_len` bytes, the spare capacity.
            // 2. Those `n` bytes after `from` are initialized: recvmsg wrote them.
            // SAFETY: by the points above.
            unsafe { self.buf.set_len(from + n) };
            // Own every fd before looking at anything else, so each error
            // below closes them.
            let fds = take_fds(&hdr);
            if hdr.msg_flags & libc::MSG_CTRUNC != 0 {
                return Err(io_err("recvmsg")(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("peer sent more than {MAX_FDS} fds with one frame (MSG_CTRUNC)"),
                )));
            }
            if !fds.is_empty() {
                if n == 0 {
                    return Err(io_err("recvmsg")(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "fds arrived without data",
                    )));
                }
                let last = self.base + (from + n - 1) as u64;
                self.fds.push_back((last, fds));
            }
            return Ok(n);
        }
    }

    /// Sets how long [`Conn::recv`] waits for bytes (`None`: forever); a
    /// timeout is `WireError::Io` with `WouldBlock` and keeps the framing.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), WireError> {
        self.stream
            .set_read_timeout(timeout)
            .map_err(io_err("set_read_timeout"))
    }

    /// Sets how long [`Conn::send`] waits for room (`None`: forever).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<(), WireError> {
        self.stream
            .set_write_timeout(timeout)
            .map_err(io_err("set_write_timeout"))
    }

    /// The peer's pid, uid and gid (SO_PEERCRED).
    pub fn peer_cred(&self) -> Result<PeerCred, WireError> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        #[allow(clippy::cast_possible_truncation)] // 12 bytes
        let mut len = size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY:
        // 1. The fd is our open socket.
        // 2. `cred` is writable for `len` bytes, the size SO_PEERCRED fills.
        let rc = unsafe {
            libc::getsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io_err("getsockopt(SO_PEERCRED)")(io::Error::last_os_error()));
        }
        Ok(PeerCred {
            pid: cred.pid,
            uid: cred.uid,
            gid: cred.gid,
        })
    }

    /// A second handle on the same socket, sharing the send lock, with a
    /// receive buffer of its own: send through any, receive through one.
    pub fn try_clone(&self) -> Result<Conn, WireError> {
        let mut clone = Conn::new(self.stream.try_clone().map_err(io_err("try_clone"))?);
        clone.send_lock = Arc::clone(&self.send_lock);
        Ok(clone)
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

/// Takes ownership of every fd in the SCM_RIGHTS messages of `hdr`.
fn take_fds(hdr: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: `hdr` was filled by a successful recvmsg; CMSG_FIRSTHDR reads
    // only its control fields.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(hdr) };
    while !cmsg.is_null() {
        // SAFETY: the kernel wrote a complete header at `cmsg` (CMSG_FIRSTHDR
        // and CMSG_NXTHDR return only headers within msg_controllen).
        let (level, ty, len) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
        if level == libc::SOL_SOCKET && ty == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) only computes a size.
            let head = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = len.saturating_sub(head) / size_of::<RawFd>();
            // SAFETY: the header's data holds `count` fds (its length
            // says so, and it lies within the control buffer).
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            for i in 0..count {
                // SAFETY:
                // 1. `data + i * 4` is within the header's data (i < count).
                // 2. read_unaligned: CMSG_DATA need not be aligned for i32.
                let raw: RawFd = unsafe { std::ptr::read_unaligned(data.cast::<RawFd>().add(i)) };
                // SAFETY: the kernel installed `raw` in this process for this
                // message; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: `cmsg` is a header within `hdr`'s control buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(hdr, cmsg) };
    }
    fds
}

#[cfg(test)]
mod tests {
    use std::{io::Write, os::unix::net::UnixStream};

    use super::*;
    use crate::{
        addr::{GuestPhysAddr, HostVirtAddr},
        service::wire::{
            Ack, AckStatus, ErrorMsg, Hello, PageRun, RegionDesc, Remap, RemapRun, RemapTo,
            Restore, Welcome,
        },
    };

    fn memfd() -> OwnedFd {
        // SAFETY:
        // 1. The name is a NUL-terminated C string.
        // 2. MFD_CLOEXEC is a valid flag.
        let fd = unsafe { libc::memfd_create(c"wire-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: memfd_create returned a new fd that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn ino(fd: BorrowedFd<'_>) -> (u64, u64) {
        // SAFETY: stat is plain data; zeros are a valid value.
        let mut st: libc::stat = unsafe { MaybeUninit::zeroed().assume_init() };
        // SAFETY: `fd` is open; `st` is writable.
        let rc = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
        assert_eq!(rc, 0, "fstat: {}", io::Error::last_os_error());
        (st.st_dev, st.st_ino)
    }

    fn pair() -> (Conn, Conn) {
        let (a, b) = UnixStream::pair().unwrap();
        (Conn::new(a), Conn::new(b))
    }

    fn messages() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                second_mapper: false,
                break_on_write: false,
                exclude_regions: 0,
                domain: 1,
                vm_tag: 2,
                regions: vec![RegionDesc {
                    gpa: GuestPhysAddr(0),
                    size: 0x20_0000,
                    host_addr: HostVirtAddr(0x7f00_0000_0000),
                    file_offset: 0,
                }],
            }),
            Message::Ack(Ack {
                seq: 1,
                status: AckStatus::Done,
                errno: 0,
            }),
            Message::Bye,
            Message::Welcome(Welcome { vm_id: 9 }),
            Message::Remap(Remap {
                seq: 3,
                region: 0,
                runs: (0..4096)
                    .map(|i| RemapRun {
                        first_page: 2 * i,
                        pages: 1,
                        target: RemapTo::Shared {
                            file_offset: i << 12,
                        },
                    })
                    .collect(),
            }),
            Message::Restore(Restore {
                seq: 4,
                region: 0,
                runs: vec![PageRun {
                    first_page: 1,
                    pages: 2,
                }],
            }),
            Message::Error(ErrorMsg::new(5, "nope")),
        ]
    }

    #[test]
    fn every_message_with_real_fds() {
        let (a, mut b) = pair();
        let files: Vec<OwnedFd> = (0..3).map(|_| memfd()).collect();
        let inos: Vec<_> = files.iter().map(|f| ino(f.as_fd())).collect();
        // All sent before any is read: frames and their fds queue up in the
        // socket and must come apart again in order.
        let sender = std::thread::spawn(move || {
            for m in messages() {
                let fds: Vec<_> = files.iter().take(m.fd_count()).map(|f| f.as_fd()).collect();
                a.send(&m, &fds).unwrap();
            }
            a
        });
        for m in messages() {
            let (got, fds) = b.recv().unwrap().unwrap();
            assert_eq!(got, m);
            assert_eq!(fds.len(), m.fd_count());
            for (fd, want) in fds.iter().zip(&inos) {
                assert_eq!(ino(fd.as_fd()), *want, "{}", m.kind_name());
                // SAFETY: `fd` is open; F_GETFD takes no argument.
                let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
                assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
            }
        }
        drop(sender.join().unwrap());
        assert!(b.recv().unwrap().is_none(), "EOF at a frame boundary");
    }

    #[test]
    fn many_small_frames_keep_fds_with_their_frame() {
        let (a, mut b) = pair();
        let f = memfd();
        let want = ino(f.as_fd());
        for i in 0..50u64 {
            a.send(
                &Message::Ack(Ack {
                    seq: i,
                    status: AckStatus::Done,
                    errno: 0,
                }),
                &[],
            )
            .unwrap();
            a.send(&Message::Welcome(Welcome { vm_id: i }), &[f.as_fd()])
                .unwrap();
        }
        drop(a);
        for i in 0..50u64 {
            let (m, fds) = b.recv().unwrap().unwrap();
            assert!(matches!(m, Message::Ack(Ack { seq, .. }) if seq == i));
            assert!(fds.is_empty());
            let (m, fds) = b.recv().unwrap().unwrap();
            assert_eq!(m, Message::Welcome(Welcome { vm_id: i }));
            assert_eq!(fds.len(), 1);
            assert_eq!(ino(fds[0].as_fd()), want);
        }
        assert!(b.recv().unwrap().is_none());
    }

    #[test]
    fn send_checks_fd_count_and_validity() {
        let (a, _b) = pair();
        let f = memfd();
        let e = a.send(&Message::Bye, &[f.as_fd()]).unwrap_err();
        assert!(matches!(
            e,
            WireError::FdCount {
                kind_name: "Bye",
                want: 0,
                got: 1
            }
        ));
        let e = a
            .send(&Message::Welcome(Welcome { vm_id: 1 }), &[])
            .unwrap_err();
        assert!(matches!(
            e,
            WireError::FdCount {
                kind_name: "Welcome",
                want: 1,
                got: 0
            }
        ));
        let bad = Message::Restore(Restore {
            seq: 0,
            region: 0,
            runs: vec![],
        });
        assert!(matches!(
            a.send(&bad, &[]),
            Err(WireError::BadCount {
                field: "run_count",
                ..
            })
        ));
    }

    /// Sends raw bytes with `n` fds attached, as a hostile peer could.
    fn send_raw(s: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let conn = Conn::new(s.try_clone().unwrap());
        assert_eq!(conn.sendmsg_fds(bytes, fds).unwrap(), bytes.len());
    }

    #[test]
    fn recv_rejects_wrong_fd_counts() {
        let f = memfd();
        // A Bye that came with an fd.
        let (a, b) = UnixStream::pair().unwrap();
        let mut frame = Vec::new();
        encode(&Message::Bye, &mut frame);
        send_raw(&a, &frame, &[f.as_fd()]);
        let e = Conn::new(b).recv().unwrap_err();
        assert!(matches!(
            e,
            WireError::FdCount {
                kind_name: "Bye",
                want: 0,
                got: 1
            }
        ));
        // A Hello with two of its three.
        let (a, b) = UnixStream::pair().unwrap();
        let mut frame = Vec::new();
        encode(&messages()[0], &mut frame);
        send_raw(&a, &frame, &[f.as_fd(), f.as_fd()]);
        let e = Conn::new(b).recv().unwrap_err();
        assert!(matches!(
            e,
            WireError::FdCount {
                kind_name: "Hello",
                want: 3,
                got: 2
            }
        ));
        // A Welcome with none.
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut frame = Vec::new();
        encode(&Message::Welcome(Welcome { vm_id: 1 }), &mut frame);
        a.write_all(&frame).unwrap();
        let e = Conn::new(b).recv().unwrap_err();
        assert!(matches!(
            e,
            WireError::FdCount {
                kind_name: "Welcome",
                want: 1,
                got: 0
            }
        ));
        // More fds than the control buffer takes: MSG_CTRUNC.
        let (a, b) = UnixStream::pair().unwrap();
        let six: Vec<_> = (0..6).map(|_| f.as_fd()).collect();
        send_raw(&a, &frame, &six);
        let e = Conn::new(b).recv().unwrap_err();
        assert!(
            matches!(&e, WireError::Io { source, .. } if source.kind() == io::ErrorKind::InvalidData),
            "{e}"
        );
    }

    #[test]
    fn fds_hoarded_by_an_unfinished_frame_are_refused() {
        let f = memfd();
        let (a, b) = UnixStream::pair().unwrap();
        let mut frame = Vec::new();
        encode(&messages()[4], &mut frame);
        // One byte per sendmsg, each with an fd: each read takes one byte
        // and one fd, and the frame never completes.
        for byte in &frame[..8] {
            send_raw(&a, std::slice::from_ref(byte), &[f.as_fd()]);
        }
        let mut conn = Conn::new(b);
        let e = conn.recv().unwrap_err();
        assert!(
            matches!(&e, WireError::Io { source, .. } if source.kind() == io::ErrorKind::InvalidData),
            "{e}"
        );
        assert_eq!(conn.fds.iter().map(|(_, b)| b.len()).sum::<usize>(), 4);
    }

    #[test]
    fn garbage_is_a_typed_error() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[0xff; 64]).unwrap();
        assert!(matches!(
            Conn::new(b).recv(),
            Err(WireError::FrameTooLong { .. })
        ));
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[4, 0, 0, 0, 0x55, 0, 0, 0]).unwrap();
        assert!(matches!(
            Conn::new(b).recv(),
            Err(WireError::UnknownKind { kind: 0x55 })
        ));
    }

    #[test]
    fn eof_mid_frame_is_an_error() {
        let mut frame = Vec::new();
        encode(&messages()[4], &mut frame);
        for cut in [1, 4, 9, frame.len() - 1] {
            let (mut a, b) = UnixStream::pair().unwrap();
            a.write_all(&frame[..cut]).unwrap();
            drop(a);
            let e = Conn::new(b).recv().unwrap_err();
            assert!(
                matches!(&e, WireError::Io { source, .. } if source.kind() == io::ErrorKind::UnexpectedEof),
                "cut {cut}: {e}"
            );
        }
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(Conn::new(b).recv().unwrap().is_none());
    }

    #[test]
    fn send_to_a_dead_peer_is_an_error() {
        let (a, b) = pair();
        drop(b);
        let e = a.send(&Message::Bye, &[]).unwrap_err();
        assert!(
            matches!(&e, WireError::Io { source, .. } if source.raw_os_error() == Some(libc::EPIPE)),
            "{e}"
        );
        let f = memfd();
        let e = a
            .send(&Message::Welcome(Welcome { vm_id: 0 }), &[f.as_fd()])
            .unwrap_err();
        assert!(matches!(e, WireError::Io { .. }), "{e}");
    }

    #[test]
    fn read_timeout_keeps_framing() {
        let (a, mut b) = pair();
        b.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut frame = Vec::new();
        encode(
            &Message::Ack(Ack {
                seq: 8,
                status: AckStatus::Done,
                errno: 0,
            }),
            &mut frame,
        );
        a.stream().write_all(&frame[..5]).unwrap();
        let e = b.recv().unwrap_err();
        assert!(
            matches!(&e, WireError::Io { source, .. } if source.kind() == io::ErrorKind::WouldBlock),
            "{e}"
        );
        a.stream().write_all(&frame[5..]).unwrap();
        let (m, _) = b.recv().unwrap().unwrap();
        assert!(matches!(m, Message::Ack(Ack { seq: 8, .. })));
    }

    #[test]
    fn peer_cred_is_ours() {
        let (a, b) = pair();
        let cred = b.peer_cred().unwrap();
        assert_eq!(cred.pid, i32::try_from(std::process::id()).unwrap());
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        assert_eq!((cred.uid, cred.gid), (uid, gid));
        assert_eq!(a.peer_cred().unwrap(), cred);
    }

    #[test]
    fn clones_sending_at_once_never_interleave_frames() {
        let (a, mut b) = pair();
        let big = messages()[4].clone();
        let senders: Vec<_> = (0..4)
            .map(|t| {
                let conn = a.try_clone().unwrap();
                let big = big.clone();
                std::thread::spawn(move || {
                    for i in 0..20 {
                        if i % 2 == 0 {
                            conn.send(&big, &[]).unwrap();
                        } else {
                            conn.send(&Message::Error(ErrorMsg::new(t, "x")), &[])
                                .unwrap();
                        }
                    }
                })
            })
            .collect();
        drop(a);
        let reader = std::thread::spawn(move || {
            let mut n = 0;
            while let Some((m, _)) = b.recv().unwrap() {
                assert!(m == big || matches!(m, Message::Error(_)));
                n += 1;
            }
            n
        });
        for s in senders {
            s.join().unwrap();
        }
        assert_eq!(reader.join().unwrap(), 80);
    }

    #[test]
    fn clone_sends_on_the_same_socket() {
        let (a, mut b) = pair();
        let a2 = a.try_clone().unwrap();
        a2.send(&Message::Bye, &[]).unwrap();
        drop((a, a2));
        assert_eq!(b.recv().unwrap().map(|(m, _)| m), Some(Message::Bye));
        assert!(b.recv().unwrap().is_none());
    }
}
