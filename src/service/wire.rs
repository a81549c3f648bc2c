//! The service's wire protocol: the messages between a VMM process (the
//! client) and the host service, their frames, and the checks every decoded
//! field passes. Owns the byte layout only; it never touches a socket or an
//! fd (`socket` carries frames and their fds) and never allocates from a
//! length a peer claims beyond the bytes actually present.
//!
//! A frame is `u32 len` (bytes after this field), `u16 kind`, `u16 reserved`
//! (0), then the body. All integers are little-endian.

use std::{fmt, io};

use crate::addr::{GuestPhysAddr, HostVirtAddr};

/// The protocol version this build speaks; `Hello` and `Welcome` carry it
/// and a decoder rejects any other.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest `len` a frame may claim (bytes after the length field).
pub const MAX_FRAME: u32 = 1 << 20;
/// Most regions a `Hello` may describe.
pub const MAX_REGIONS: u32 = 64;
/// Most runs a `Remap` or `Restore` may carry.
pub const MAX_RUNS: u32 = 4096;
/// Longest text, in bytes, of an `Error` message.
pub const MAX_ERROR_TEXT: u32 = 4096;
/// A `Remap` target meaning "anonymous zeros" rather than an offset into the
/// shared memfd.
pub const ZERO_TARGET: u64 = u64::MAX;
/// Bytes of a frame header: `len`, `kind`, `reserved`.
pub const HEADER_LEN: usize = 8;
/// `Hello` flag bit 0: the client is a second mapper (a vhost-user backend),
/// not the VM's VMM.
pub const HELLO_SECOND_MAPPER: u32 = 1;
/// `Hello` flag bit 1: the VM's memory is shared with other processes
/// (vhost-user backends), so its merged pages stay write-protected in
/// every mapper and a write breaks the sharing through the service into a
/// frame every mapper maps, instead of the kernel's private copy.
pub const HELLO_BREAK_ON_WRITE: u32 = 2;

/// Alignment every address, size and file offset on the wire keeps.
const PAGE: u64 = 4096;
/// Bytes of a frame after `len` that are not body: `kind`, `reserved`.
const KIND_AND_RESERVED: u32 = 4;

/// Frame kinds.
pub mod kind {
    /// Client -> service: [`super::Hello`].
    pub const HELLO: u16 = 1;
    /// Client -> service: [`super::Ack`].
    pub const ACK: u16 = 2;
    /// Client -> service: `Bye`.
    pub const BYE: u16 = 3;
    /// Client -> service: [`super::Break`].
    pub const BREAK: u16 = 4;
    /// Service -> client: [`super::Welcome`].
    pub const WELCOME: u16 = 16;
    /// Service -> client: [`super::Remap`].
    pub const REMAP: u16 = 17;
    /// Service -> client: [`super::Restore`].
    pub const RESTORE: u16 = 18;
    /// Service -> client: [`super::ErrorMsg`].
    pub const ERROR: u16 = 19;
    /// Service -> client: `Home` (a [`super::Restore`] without the copy).
    pub const HOME: u16 = 20;
    /// Service -> second mapper: `Ready`, every merged run told.
    pub const READY: u16 = 21;
}

/// Shows an optional item index as ` N` (or nothing).
#[derive(Debug)]
struct At(Option<u32>);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(i) => write!(f, " {i}"),
            None => Ok(()),
        }
    }
}

/// What is wrong with a frame, or with the socket that carried it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A frame claims more bytes than any message may have.
    #[error("frame length {len} exceeds the maximum {max}")]
    FrameTooLong {
        /// The claimed length.
        len: u32,
        /// [`MAX_FRAME`].
        max: u32,
    },
    /// A frame kind this version does not know.
    #[error("unknown frame kind {kind}")]
    UnknownKind {
        /// The kind field.
        kind: u16,
    },
    /// A reserved field is not zero.
    #[error("{kind_name}: reserved field {field} is not zero")]
    Reserved {
        /// The message (or "frame" for the header).
        kind_name: &'static str,
        /// The field.
        field: &'static str,
    },
    /// The peer speaks another protocol version.
    #[error("protocol version {got}, this build speaks {want}")]
    Version {
        /// The version the peer sent.
        got: u32,
        /// [`PROTOCOL_VERSION`].
        want: u32,
    },
    /// A count is out of its range: zero where items must come, or above
    /// its maximum.
    #[error("{field} is {count}, outside its allowed range (max {max}; a run or region count must not be 0)")]
    BadCount {
        /// The count field.
        field: &'static str,
        /// Its value.
        count: u64,
        /// The largest value allowed.
        max: u64,
    },
    /// A field holds a value the protocol forbids.
    #[error("{message}{}: {field} = {value:#x} {reason}", At(*.index))]
    BadField {
        /// The message kind.
        message: &'static str,
        /// The index of the region or run, where the field belongs to one.
        index: Option<u32>,
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A body holds bytes beyond its last field.
    #[error("{kind_name}: {extra} bytes after the last field")]
    TrailingBytes {
        /// The message.
        kind_name: &'static str,
        /// How many bytes are left over.
        extra: usize,
    },
    /// A frame ends before one of its fields.
    #[error("{kind_name}: frame ends before field {field}")]
    Truncated {
        /// The message (or "frame" for the header).
        kind_name: &'static str,
        /// The first field that does not fit.
        field: &'static str,
    },
    /// An `Error` message's text is not UTF-8.
    #[error("Error: text is not valid UTF-8")]
    BadUtf8,
    /// A message arrived (or was to be sent) with the wrong number of fds.
    #[error("{kind_name} travels with {want} fds, got {got}")]
    FdCount {
        /// The message.
        kind_name: &'static str,
        /// [`Message::fd_count`].
        want: usize,
        /// The fds that came (or were given).
        got: usize,
    },
    /// The socket failed (or the peer closed it mid-frame:
    /// `io::ErrorKind::UnexpectedEof`).
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// One region of a client's guest memory: where it is in the guest, where
/// the client maps it, and where its bytes are in the guest memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionDesc {
    /// First guest-physical address (4 KiB aligned).
    pub gpa: GuestPhysAddr,
    /// Bytes (nonzero, a multiple of 4 KiB).
    pub size: u64,
    /// Where the client maps the region (4 KiB aligned).
    pub host_addr: HostVirtAddr,
    /// Offset of the region's first byte in the guest memfd (4 KiB aligned).
    pub file_offset: u64,
}

/// Client -> service, first message, with 3 fds: the guest memfd, a
/// userfaultfd, a control memfd. The version on the wire is always
/// [`PROTOCOL_VERSION`] (a decoder rejects any other).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The client maps a VM's memory besides its VMM (flag bit 0).
    pub second_mapper: bool,
    /// Writes to merged pages break through the service (flag bit 1; see
    /// [`HELLO_BREAK_ON_WRITE`]). A second mapper always sets it.
    pub break_on_write: bool,
    /// The merge domain the VM belongs to.
    pub domain: u64,
    /// The caller's label for the VM.
    pub vm_tag: u64,
    /// The guest memory, sorted by gpa, not overlapping (1..=[`MAX_REGIONS`]).
    pub regions: Vec<RegionDesc>,
    /// Regions the service must leave unmerged: bit `i` for `regions[i]`
    /// (after the regions on the wire; no bit past the last region).
    pub exclude_regions: u64,
}

/// How a client handled a `Remap` or `Restore`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckStatus {
    /// Applied.
    Done = 0,
    /// Not applied: the window was revoked before the client took it.
    Skipped = 1,
    /// Applying failed (`errno` says why).
    Failed = 2,
}

/// Client -> service: the answer to the `Remap` or `Restore` with `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The sequence number of the message answered.
    pub seq: u64,
    /// What happened.
    pub status: AckStatus,
    /// The OS error where `status` is `Failed`, else 0.
    pub errno: u32,
}

/// Service -> client, the answer to `Hello`, with 1 fd: the domain's
/// shared-frame memfd, read-only. The version on the wire is always
/// [`PROTOCOL_VERSION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// The VM's id in the service.
    pub vm_id: u64,
}

/// Where a remapped run of pages now maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemapTo {
    /// The shared memfd, from this byte offset (4 KiB aligned).
    Shared {
        /// Byte offset into the shared memfd.
        file_offset: u64,
    },
    /// Anonymous zero pages ([`ZERO_TARGET`] on the wire).
    Zero,
}

/// A run of pages of a region and their new backing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemapRun {
    /// First page, counted from the region's start.
    pub first_page: u64,
    /// Pages (at least 1).
    pub pages: u64,
    /// The new backing of the first page (the rest follow it).
    pub target: RemapTo,
}

/// A run of pages of a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// First page, counted from the region's start.
    pub first_page: u64,
    /// Pages (at least 1).
    pub pages: u64,
}

/// Where `pages` pages from page `first` of a region mapped at `host_addr`
/// with `region_pages` pages lie in the mapping (address, bytes), if they
/// lie inside it: how both ends turn a run of a message into addresses,
/// so nothing a peer says reaches outside the region.
pub(crate) fn run_span(
    host_addr: HostVirtAddr,
    region_pages: usize,
    first: u64,
    pages: u64,
) -> Option<(HostVirtAddr, usize)> {
    let first = usize::try_from(first).ok()?;
    let pages = usize::try_from(pages).ok()?;
    if pages == 0 || first.checked_add(pages)? > region_pages {
        return None;
    }
    let page = usize::try_from(PAGE).ok()?;
    let addr = host_addr
        .0
        .checked_add(u64::try_from(first.checked_mul(page)?).ok()?)?;
    Some((HostVirtAddr(addr), pages.checked_mul(page)?))
}

/// Service -> client: map these runs of a region on shared frames or zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remap {
    /// Sequence number the `Ack` names.
    pub seq: u64,
    /// Index of the region in the client's `Hello`.
    pub region: u32,
    /// Sorted, not overlapping (1..=[`MAX_RUNS`]).
    pub runs: Vec<RemapRun>,
}

/// Service -> client: copy the current bytes of these pages into the
/// client's own memfd at their own offsets and map them shared there again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    /// Sequence number the `Ack` names.
    pub seq: u64,
    /// Index of the region in the client's `Hello`.
    pub region: u32,
    /// Sorted, not overlapping (1..=[`MAX_RUNS`]).
    pub runs: Vec<PageRun>,
}

/// Service -> client: why the service refuses or closes the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    /// A machine-readable code.
    pub code: u32,
    /// Text for a person, at most [`MAX_ERROR_TEXT`] bytes.
    pub text: String,
}

impl ErrorMsg {
    /// An error message whose text is cut (at a character boundary) to
    /// [`MAX_ERROR_TEXT`] bytes, so it always encodes to a valid frame.
    pub fn new(code: u32, text: &str) -> Self {
        let mut end = text.len().min(MAX_ERROR_TEXT as usize);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        ErrorMsg {
            code,
            text: text[..end].to_owned(),
        }
    }
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Client -> service, kind 1, 3 fds.
    Hello(Hello),
    /// Client -> service, kind 2.
    Ack(Ack),
    /// Client -> service, kind 3: the client leaves.
    Bye,
    /// Service -> client, kind 16, 1 fd.
    Welcome(Welcome),
    /// Service -> client, kind 17.
    Remap(Remap),
    /// Service -> client, kind 18.
    Restore(Restore),
    /// Service -> client, kind 19.
    Error(ErrorMsg),
    /// Client -> service, kind 4: a write waits on a merged page.
    Break(Break),
    /// Service -> client, kind 20: map these pages shared at their own
    /// frames again, still write-protected; the service copied them.
    Home(Restore),
    /// Service -> second mapper, kind 21: it has been told every merged
    /// run of the VM (after its `Welcome`), and may touch the memory.
    Ready,
}

/// Client -> service: a writer of this process waits on write protection
/// at `page` of `region` (a merged page, in break-on-write mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Break {
    /// Index of the region in the client's `Hello`.
    pub region: u32,
    /// The page, counted from the region's start.
    pub page: u64,
}

impl Message {
    /// How many fds travel with the message (SCM_RIGHTS).
    pub fn fd_count(&self) -> usize {
        match self {
            Message::Hello(_) => 3,
            Message::Welcome(_) => 1,
            Message::Ack(_)
            | Message::Bye
            | Message::Remap(_)
            | Message::Restore(_)
            | Message::Error(_)
            | Message::Break(_)
            | Message::Home(_)
            | Message::Ready => 0,
        }
    }

    /// The message's name, as errors show it.
    pub fn kind_name(&self) -> &'static str {
        kind_name(self.kind()).unwrap_or("?")
    }

    /// The frame kind.
    pub fn kind(&self) -> u16 {
        match self {
            Message::Hello(_) => kind::HELLO,
            Message::Ack(_) => kind::ACK,
            Message::Bye => kind::BYE,
            Message::Welcome(_) => kind::WELCOME,
            Message::Remap(_) => kind::REMAP,
            Message::Restore(_) => kind::RESTORE,
            Message::Error(_) => kind::ERROR,
            Message::Break(_) => kind::BREAK,
            Message::Home(_) => kind::HOME,
            Message::Ready => kind::READY,
        }
    }

    /// Checks what a decoder checks after parsing: counts, alignment,
    /// overflow, order. A message that passes encodes to a frame [`decode`]
    /// accepts and returns equal.
    pub fn validate(&self) -> Result<(), WireError> {
        match self {
            Message::Hello(h) => {
                check_count("region_count", h.regions.len(), MAX_REGIONS)?;
                check_regions(&h.regions)?;
                let n = h.regions.len();
                if n < 64 && h.exclude_regions >> n != 0 {
                    return Err(WireError::BadField {
                        message: "Hello",
                        index: None,
                        field: "exclude_regions",
                        value: h.exclude_regions,
                        reason: "names a region past the last",
                    });
                }
                Ok(())
            }
            Message::Ack(_)
            | Message::Bye
            | Message::Welcome(_)
            | Message::Break(_)
            | Message::Ready => Ok(()),
            Message::Remap(r) => {
                check_count("run_count", r.runs.len(), MAX_RUNS)?;
                let mut prev_end = None;
                for (i, run) in r.runs.iter().enumerate() {
                    let index = index_u32(i);
                    prev_end = Some(check_run(
                        "Remap",
                        index,
                        run.first_page,
                        run.pages,
                        prev_end,
                    )?);
                    if let RemapTo::Shared { file_offset } = run.target {
                        check_target(index, file_offset, run.pages)?;
                    }
                }
                Ok(())
            }
            Message::Restore(r) | Message::Home(r) => {
                check_count("run_count", r.runs.len(), MAX_RUNS)?;
                let mut prev_end = None;
                for (i, run) in r.runs.iter().enumerate() {
                    prev_end = Some(check_run(
                        self.kind_name(),
                        index_u32(i),
                        run.first_page,
                        run.pages,
                        prev_end,
                    )?);
                }
                Ok(())
            }
            Message::Error(e) => {
                let len = e.text.len();
                if len > MAX_ERROR_TEXT as usize {
                    return Err(WireError::BadCount {
                        field: "len",
                        count: len as u64,
                        max: u64::from(MAX_ERROR_TEXT),
                    });
                }
                Ok(())
            }
        }
    }
}

/// The name of a frame kind, or `None` for one this version does not know.
pub fn kind_name(kind: u16) -> Option<&'static str> {
    Some(match kind {
        kind::HELLO => "Hello",
        kind::ACK => "Ack",
        kind::BYE => "Bye",
        kind::WELCOME => "Welcome",
        kind::REMAP => "Remap",
        kind::RESTORE => "Restore",
        kind::BREAK => "Break",
        kind::HOME => "Home",
        kind::READY => "Ready",
        kind::ERROR => "Error",
        _ => return None,
    })
}

/// An item index as the wire numbers it (counts are at most
/// [`MAX_RUNS`], so it always fits).
fn index_u32(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

fn check_count(field: &'static str, count: usize, max: u32) -> Result<(), WireError> {
    if count == 0 || count > max as usize {
        return Err(WireError::BadCount {
            field,
            count: count as u64,
            max: u64::from(max),
        });
    }
    Ok(())
}

fn bad(
    message: &'static str,
    index: Option<u32>,
    field: &'static str,
    value: u64,
    reason: &'static str,
) -> WireError {
    WireError::BadField {
        message,
        index,
        field,
        value,
        reason,
    }
}

fn check_regions(regions: &[RegionDesc]) -> Result<(), WireError> {
    const NOT_ALIGNED: &str = "is not 4 KiB aligned";
    let mut prev_end: Option<u64> = None;
    for (i, r) in regions.iter().enumerate() {
        let at = Some(index_u32(i));
        let bad = |field, value, reason| bad("Hello region", at, field, value, reason);
        if r.size == 0 || r.size % PAGE != 0 {
            return Err(bad("size", r.size, "is not a nonzero multiple of 4 KiB"));
        }
        if r.gpa.0 % PAGE != 0 {
            return Err(bad("gpa", r.gpa.0, NOT_ALIGNED));
        }
        if r.host_addr.0 % PAGE != 0 {
            return Err(bad("host_addr", r.host_addr.0, NOT_ALIGNED));
        }
        if r.file_offset % PAGE != 0 {
            return Err(bad("file_offset", r.file_offset, NOT_ALIGNED));
        }
        let Some(end) = r.gpa.0.checked_add(r.size) else {
            return Err(bad("size", r.size, "makes gpa + size overflow"));
        };
        if r.host_addr.0.checked_add(r.size).is_none() {
            return Err(bad("size", r.size, "makes host_addr + size overflow"));
        }
        if r.file_offset.checked_add(r.size).is_none() {
            return Err(bad("size", r.size, "makes file_offset + size overflow"));
        }
        if prev_end.is_some_and(|p| r.gpa.0 < p) {
            return Err(bad(
                "gpa",
                r.gpa.0,
                "is below the end of the previous region (regions must be sorted and not overlap)",
            ));
        }
        prev_end = Some(end);
    }
    Ok(())
}

/// Checks one run and returns its end page.
fn check_run(
    message: &'static str,
    index: u32,
    first_page: u64,
    pages: u64,
    prev_end: Option<u64>,
) -> Result<u64, WireError> {
    let at = Some(index);
    if pages == 0 {
        return Err(bad(message, at, "pages", 0, "is zero"));
    }
    // A page index times 4 KiB is a byte offset in a region: the run's end
    // must stay addressable.
    let end = first_page
        .checked_add(pages)
        .filter(|&e| e <= u64::MAX / PAGE)
        .ok_or_else(|| {
            bad(
                message,
                at,
                "pages",
                pages,
                "puts the run's end beyond the 64-bit address space",
            )
        })?;
    if prev_end.is_some_and(|p| first_page < p) {
        return Err(bad(
            message,
            at,
            "first_page",
            first_page,
            "is below the end of the previous run (runs must be sorted and not overlap)",
        ));
    }
    Ok(end)
}

fn check_target(index: u32, file_offset: u64, pages: u64) -> Result<(), WireError> {
    let at = Some(index);
    if file_offset % PAGE != 0 {
        return Err(bad(
            "Remap",
            at,
            "target",
            file_offset,
            "is neither 4 KiB aligned nor ZERO_TARGET",
        ));
    }
    // `pages` is below u64::MAX / PAGE once `check_run` passed.
    if file_offset
        .checked_add(pages.saturating_mul(PAGE))
        .is_none()
    {
        return Err(bad(
            "Remap",
            at,
            "target",
            file_offset,
            "+ the run's bytes overflows",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- encode --

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A count as the wire holds it; a count beyond `u32` is written as
/// `u32::MAX`, which every decoder rejects.
fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Appends one frame holding `msg` to `out`. Encoding does not check the
/// message: one that fails [`Message::validate`] makes a frame the peer
/// rejects (`socket::Conn::send` validates first).
pub fn encode(msg: &Message, out: &mut Vec<u8>) {
    let start = out.len();
    put_u32(out, 0); // len, patched below
    put_u16(out, msg.kind());
    put_u16(out, 0);
    match msg {
        Message::Hello(h) => {
            put_u32(out, PROTOCOL_VERSION);
            put_u32(
                out,
                if h.second_mapper {
                    HELLO_SECOND_MAPPER
                } else {
                    0
                } | if h.break_on_write {
                    HELLO_BREAK_ON_WRITE
                } else {
                    0
                },
            );
            put_u64(out, h.domain);
            put_u64(out, h.vm_tag);
            put_u32(out, count_u32(h.regions.len()));
            put_u32(out, 0);
            for r in &h.regions {
                put_u64(out, r.gpa.0);
                put_u64(out, r.size);
                put_u64(out, r.host_addr.0);
                put_u64(out, r.file_offset);
            }
            put_u64(out, h.exclude_regions);
        }
        Message::Ack(a) => {
            put_u64(out, a.seq);
            put_u32(out, a.status as u32);
            put_u32(out, a.errno);
        }
        Message::Bye | Message::Ready => {}
        Message::Welcome(w) => {
            put_u64(out, w.vm_id);
            put_u32(out, PROTOCOL_VERSION);
            put_u32(out, 0);
        }
        Message::Remap(r) => {
            put_u64(out, r.seq);
            put_u32(out, r.region);
            put_u32(out, count_u32(r.runs.len()));
            for run in &r.runs {
                put_u64(out, run.first_page);
                put_u64(out, run.pages);
                put_u64(
                    out,
                    match run.target {
                        RemapTo::Shared { file_offset } => file_offset,
                        RemapTo::Zero => ZERO_TARGET,
                    },
                );
            }
        }
        Message::Break(b) => {
            put_u32(out, b.region);
            put_u32(out, 0);
            put_u64(out, b.page);
        }
        Message::Restore(r) | Message::Home(r) => {
            put_u64(out, r.seq);
            put_u32(out, r.region);
            put_u32(out, count_u32(r.runs.len()));
            for run in &r.runs {
                put_u64(out, run.first_page);
                put_u64(out, run.pages);
            }
        }
        Message::Error(e) => {
            put_u32(out, e.code);
            put_u32(out, count_u32(e.text.len()));
            out.extend_from_slice(e.text.as_bytes());
        }
    }
    let len = count_u32(out.len() - start - 4);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

// ---------------------------------------------------------------- decode --

/// A cursor over one frame's body; every read names the field it wants.
struct Body<'a> {
    kind_name: &'static str,
    bytes: &'a [u8],
}

impl<'a> Body<'a> {
    fn take<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let Some((head, rest)) = self.bytes.split_first_chunk::<N>() else {
            return Err(WireError::Truncated {
                kind_name: self.kind_name,
                field,
            });
        };
        self.bytes = rest;
        Ok(*head)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        self.take::<4>(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        self.take::<8>(field).map(u64::from_le_bytes)
    }

    fn reserved32(&mut self, field: &'static str) -> Result<(), WireError> {
        if self.u32(field)? != 0 {
            return Err(WireError::Reserved {
                kind_name: self.kind_name,
                field,
            });
        }
        Ok(())
    }

    fn version(&mut self) -> Result<(), WireError> {
        let got = self.u32("version")?;
        if got != PROTOCOL_VERSION {
            return Err(WireError::Version {
                got,
                want: PROTOCOL_VERSION,
            });
        }
        Ok(())
    }

    /// A count in 1..=max, and the capacity to reserve for its items
    /// (`item` bytes each): no more than the body has bytes for.
    fn count(
        &mut self,
        field: &'static str,
        max: u32,
        item: usize,
    ) -> Result<(u32, usize), WireError> {
        let n = self.u32(field)?;
        check_count(field, n as usize, max)?;
        Ok((n, (n as usize).min(self.bytes.len() / item)))
    }

    fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        if self.bytes.len() < n {
            return Err(WireError::Truncated {
                kind_name: self.kind_name,
                field,
            });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn finish(self) -> Result<(), WireError> {
        if !self.bytes.is_empty() {
            return Err(WireError::TrailingBytes {
                kind_name: self.kind_name,
                extra: self.bytes.len(),
            });
        }
        Ok(())
    }
}

/// Decodes the frame at the start of `buf`: `Ok(None)` while `buf` holds
/// less than the frame (read more and call again), `Ok(Some((msg, n)))` with
/// the `n` bytes the frame took, or the first thing wrong with it. Never
/// panics and never allocates beyond what the bytes present can fill.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, WireError> {
    let Some(len) = buf.first_chunk::<4>().map(|b| u32::from_le_bytes(*b)) else {
        return Ok(None);
    };
    if len > MAX_FRAME {
        return Err(WireError::FrameTooLong {
            len,
            max: MAX_FRAME,
        });
    }
    if len < KIND_AND_RESERVED {
        return Err(WireError::Truncated {
            kind_name: "frame",
            field: if len < 2 { "kind" } else { "reserved" },
        });
    }
    // Reject a bad header as soon as it is here, before waiting for a body.
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let kind = u16::from_le_bytes([header[4], header[5]]);
    let Some(name) = kind_name(kind) else {
        return Err(WireError::UnknownKind { kind });
    };
    if u16::from_le_bytes([header[6], header[7]]) != 0 {
        return Err(WireError::Reserved {
            kind_name: name,
            field: "frame reserved",
        });
    }
    let total = 4 + len as usize;
    let Some(body) = buf.get(HEADER_LEN..total) else {
        return Ok(None);
    };
    let mut b = Body {
        kind_name: name,
        bytes: body,
    };
    let msg = match kind {
        kind::HELLO => {
            b.version()?;
            let flags = b.u32("flags")?;
            if flags & !(HELLO_SECOND_MAPPER | HELLO_BREAK_ON_WRITE) != 0 {
                return Err(bad(
                    "Hello",
                    None,
                    "flags",
                    u64::from(flags),
                    "has unknown bits set (only bits 0 and 1 are defined)",
                ));
            }
            let domain = b.u64("domain")?;
            let vm_tag = b.u64("vm_tag")?;
            let (n, cap) = b.count("region_count", MAX_REGIONS, 32)?;
            b.reserved32("reserved")?;
            let mut regions = Vec::with_capacity(cap);
            for _ in 0..n {
                regions.push(RegionDesc {
                    gpa: GuestPhysAddr(b.u64("region gpa")?),
                    size: b.u64("region size")?,
                    host_addr: HostVirtAddr(b.u64("region host_addr")?),
                    file_offset: b.u64("region file_offset")?,
                });
            }
            let exclude_regions = b.u64("exclude_regions")?;
            Message::Hello(Hello {
                second_mapper: flags & HELLO_SECOND_MAPPER != 0,
                break_on_write: flags & HELLO_BREAK_ON_WRITE != 0,
                domain,
                vm_tag,
                regions,
                exclude_regions,
            })
        }
        kind::ACK => {
            let seq = b.u64("seq")?;
            let status = match b.u32("status")? {
                0 => AckStatus::Done,
                1 => AckStatus::Skipped,
                2 => AckStatus::Failed,
                s => {
                    return Err(bad(
                        "Ack",
                        None,
                        "status",
                        u64::from(s),
                        "is not Done (0), Skipped (1) or Failed (2)",
                    ))
                }
            };
            let errno = b.u32("errno")?;
            Message::Ack(Ack { seq, status, errno })
        }
        kind::BYE => Message::Bye,
        kind::READY => Message::Ready,
        kind::WELCOME => {
            let vm_id = b.u64("vm_id")?;
            b.version()?;
            b.reserved32("reserved")?;
            Message::Welcome(Welcome { vm_id })
        }
        kind::REMAP => {
            let seq = b.u64("seq")?;
            let region = b.u32("region")?;
            let (n, cap) = b.count("run_count", MAX_RUNS, 24)?;
            let mut runs = Vec::with_capacity(cap);
            for _ in 0..n {
                let first_page = b.u64("run first_page")?;
                let pages = b.u64("run pages")?;
                let target = match b.u64("run target")? {
                    ZERO_TARGET => RemapTo::Zero,
                    file_offset => RemapTo::Shared { file_offset },
                };
                runs.push(RemapRun {
                    first_page,
                    pages,
                    target,
                });
            }
            Message::Remap(Remap { seq, region, runs })
        }
        kind::RESTORE | kind::HOME => {
            let seq = b.u64("seq")?;
            let region = b.u32("region")?;
            let (n, cap) = b.count("run_count", MAX_RUNS, 16)?;
            let mut runs = Vec::with_capacity(cap);
            for _ in 0..n {
                runs.push(PageRun {
                    first_page: b.u64("run first_page")?,
                    pages: b.u64("run pages")?,
                });
            }
            let r = Restore { seq, region, runs };
            if kind == kind::HOME {
                Message::Home(r)
            } else {
                Message::Restore(r)
            }
        }
        kind::BREAK => {
            let region = b.u32("region")?;
            b.reserved32("reserved")?;
            let page = b.u64("page")?;
            Message::Break(Break { region, page })
        }
        kind::ERROR => {
            let code = b.u32("code")?;
            let n = b.u32("len")?;
            if n > MAX_ERROR_TEXT {
                return Err(WireError::BadCount {
                    field: "len",
                    count: u64::from(n),
                    max: u64::from(MAX_ERROR_TEXT),
                });
            }
            let text = b.bytes(n as usize, "text")?;
            let text = std::str::from_utf8(text).map_err(|_| WireError::BadUtf8)?;
            Message::Error(ErrorMsg {
                code,
                text: text.to_owned(),
            })
        }
        // `kind_name` knew the kind, and every known kind is matched above.
        _ => return Err(WireError::UnknownKind { kind }),
    };
    b.finish()?;
    msg.validate()?;
    Ok(Some((msg, total)))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn region(gpa: u64, size: u64, host: u64, off: u64) -> RegionDesc {
        RegionDesc {
            gpa: GuestPhysAddr(gpa),
            size,
            host_addr: HostVirtAddr(host),
            file_offset: off,
        }
    }

    fn hello() -> Hello {
        Hello {
            second_mapper: true,
            break_on_write: true,
            exclude_regions: 0b10,
            domain: 7,
            vm_tag: 0xfeed,
            regions: vec![
                region(0, 0x10_0000, 0x7f00_0000_0000, 0),
                region(0x1_0000_0000, 0x2000, 0x7f10_0000_0000, 0x10_0000),
            ],
        }
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(hello()),
            Message::Ack(Ack {
                seq: 9,
                status: AckStatus::Skipped,
                errno: 0,
            }),
            Message::Ack(Ack {
                seq: u64::MAX,
                status: AckStatus::Failed,
                errno: 12,
            }),
            Message::Bye,
            Message::Welcome(Welcome { vm_id: 3 }),
            Message::Remap(Remap {
                seq: 1,
                region: 1,
                runs: vec![
                    RemapRun {
                        first_page: 0,
                        pages: 2,
                        target: RemapTo::Shared {
                            file_offset: 0x5000,
                        },
                    },
                    RemapRun {
                        first_page: 2,
                        pages: 1,
                        target: RemapTo::Zero,
                    },
                ],
            }),
            Message::Restore(Restore {
                seq: 2,
                region: 0,
                runs: vec![
                    PageRun {
                        first_page: 5,
                        pages: 3,
                    },
                    PageRun {
                        first_page: 100,
                        pages: 1,
                    },
                ],
            }),
            Message::Home(Restore {
                seq: 3,
                region: 1,
                runs: vec![PageRun {
                    first_page: 0,
                    pages: 9,
                }],
            }),
            Message::Break(Break {
                region: 2,
                page: 77,
            }),
            Message::Ready,
            Message::Error(ErrorMsg::new(4, "domain full: ü")),
            Message::Error(ErrorMsg::new(0, "")),
        ]
    }

    fn frame(msg: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        encode(msg, &mut out);
        out
    }

    /// A frame of `kind` around `body`, with `len` patched to the truth.
    fn raw(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_u32(&mut out, u32::try_from(body.len() + 4).unwrap_or(u32::MAX));
        put_u16(&mut out, kind);
        put_u16(&mut out, 0);
        out.extend_from_slice(body);
        out
    }

    fn body(msg: &Message) -> Vec<u8> {
        frame(msg)[HEADER_LEN..].to_vec()
    }

    fn decode_err(bytes: &[u8]) -> WireError {
        match decode(bytes) {
            Err(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn every_message_round_trips() {
        for msg in samples() {
            let bytes = frame(&msg);
            assert_eq!(decode(&bytes).unwrap(), Some((msg.clone(), bytes.len())));
            assert!(msg.validate().is_ok(), "{msg:?}");
        }
    }

    #[test]
    fn fd_counts_and_names() {
        let want = [
            ("Hello", 3),
            ("Ack", 0),
            ("Ack", 0),
            ("Bye", 0),
            ("Welcome", 1),
            ("Remap", 0),
            ("Restore", 0),
            ("Home", 0),
            ("Break", 0),
            ("Ready", 0),
            ("Error", 0),
            ("Error", 0),
        ];
        assert_eq!(samples().len(), want.len());
        for (msg, (name, fds)) in samples().iter().zip(want) {
            assert_eq!(msg.kind_name(), name);
            assert_eq!(msg.fd_count(), fds);
        }
    }

    #[test]
    fn frames_back_to_back_and_partial() {
        let mut stream = Vec::new();
        for m in samples() {
            encode(&m, &mut stream);
        }
        let mut at = 0;
        for m in samples() {
            // Every proper prefix of the frame asks for more bytes.
            let (got, n) = decode(&stream[at..]).unwrap().unwrap();
            for cut in 0..n {
                assert_eq!(decode(&stream[at..at + cut]).unwrap(), None, "cut {cut}");
            }
            assert_eq!(got, m);
            at += n;
        }
        assert_eq!(at, stream.len());
        assert_eq!(decode(&[]).unwrap(), None);
    }

    #[test]
    fn header_errors() {
        let mut b = frame(&Message::Bye);
        b[0..4].copy_from_slice(&(MAX_FRAME + 1).to_le_bytes());
        // Rejected from the length alone, before any body arrives.
        assert!(matches!(
            decode_err(&b[..4]),
            WireError::FrameTooLong { len, max: MAX_FRAME } if len == MAX_FRAME + 1
        ));
        assert!(matches!(
            decode_err(&[1, 0, 0, 0, 3]),
            WireError::Truncated {
                kind_name: "frame",
                field: "kind"
            }
        ));
        assert!(matches!(
            decode_err(&[3, 0, 0, 0, 3, 0, 0]),
            WireError::Truncated {
                kind_name: "frame",
                field: "reserved"
            }
        ));
        let mut b = raw(99, &[]);
        b.extend_from_slice(&[0; 3]);
        assert!(matches!(
            decode_err(&b),
            WireError::UnknownKind { kind: 99 }
        ));
        // Unknown kind rejected from the header alone.
        let mut b = raw(99, &[1, 2, 3]);
        b.truncate(HEADER_LEN);
        assert!(matches!(
            decode_err(&b),
            WireError::UnknownKind { kind: 99 }
        ));
        let mut b = frame(&Message::Bye);
        b[6] = 1;
        assert!(matches!(
            decode_err(&b),
            WireError::Reserved {
                kind_name: "Bye",
                field: "frame reserved"
            }
        ));
    }

    #[test]
    fn trailing_and_truncated_bodies() {
        let mut b = body(&Message::Welcome(Welcome { vm_id: 1 }));
        b.push(0);
        assert!(matches!(
            decode_err(&raw(kind::WELCOME, &b)),
            WireError::TrailingBytes {
                kind_name: "Welcome",
                extra: 1
            }
        ));
        assert!(matches!(
            decode_err(&raw(kind::BYE, &[0; 2])),
            WireError::TrailingBytes {
                kind_name: "Bye",
                extra: 2
            }
        ));
        let b = body(&Message::Ack(Ack {
            seq: 1,
            status: AckStatus::Done,
            errno: 0,
        }));
        assert!(matches!(
            decode_err(&raw(kind::ACK, &b[..10])),
            WireError::Truncated {
                kind_name: "Ack",
                field: "status"
            }
        ));
        // A Hello claiming 2 regions but holding one and a half.
        let b = body(&Message::Hello(hello()));
        assert!(matches!(
            decode_err(&raw(kind::HELLO, &b[..b.len() - 24])),
            WireError::Truncated {
                kind_name: "Hello",
                field: "region host_addr"
            }
        ));
        // A Remap claiming the maximum of runs with none present: an
        // error, not an allocation of MAX_RUNS runs first.
        let mut b = Vec::new();
        put_u64(&mut b, 1);
        put_u32(&mut b, 0);
        put_u32(&mut b, MAX_RUNS);
        assert!(matches!(
            decode_err(&raw(kind::REMAP, &b)),
            WireError::Truncated {
                kind_name: "Remap",
                field: "run first_page"
            }
        ));
        let mut b = Vec::new();
        put_u32(&mut b, 1);
        put_u32(&mut b, 10);
        b.extend_from_slice(b"short");
        assert!(matches!(
            decode_err(&raw(kind::ERROR, &b)),
            WireError::Truncated {
                kind_name: "Error",
                field: "text"
            }
        ));
    }

    #[test]
    fn version_flags_and_reserved() {
        let mut b = body(&Message::Hello(hello()));
        b[0..4].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(
            decode_err(&raw(kind::HELLO, &b)),
            WireError::Version { got: 2, want: 1 }
        ));
        let mut b = body(&Message::Hello(hello()));
        b[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert!(matches!(
            decode_err(&raw(kind::HELLO, &b)),
            WireError::BadField {
                message: "Hello",
                index: None,
                field: "flags",
                value: 7,
                ..
            }
        ));
        let mut b = body(&Message::Hello(hello()));
        b[28] = 1;
        assert!(matches!(
            decode_err(&raw(kind::HELLO, &b)),
            WireError::Reserved {
                kind_name: "Hello",
                field: "reserved"
            }
        ));
        let mut b = body(&Message::Welcome(Welcome { vm_id: 1 }));
        b[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            decode_err(&raw(kind::WELCOME, &b)),
            WireError::Version { got: 0, want: 1 }
        ));
        let mut b = body(&Message::Welcome(Welcome { vm_id: 1 }));
        b[12] = 1;
        assert!(matches!(
            decode_err(&raw(kind::WELCOME, &b)),
            WireError::Reserved {
                kind_name: "Welcome",
                field: "reserved"
            }
        ));
        let mut b = body(&Message::Ack(Ack {
            seq: 1,
            status: AckStatus::Done,
            errno: 0,
        }));
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            decode_err(&raw(kind::ACK, &b)),
            WireError::BadField {
                message: "Ack",
                field: "status",
                value: 3,
                ..
            }
        ));
    }

    fn hello_with(regions: Vec<RegionDesc>) -> Vec<u8> {
        frame(&Message::Hello(Hello { regions, ..hello() }))
    }

    fn field_of(e: &WireError) -> (Option<u32>, &'static str) {
        match e {
            WireError::BadField { index, field, .. } => (*index, field),
            other => panic!("expected BadField, got {other:?}"),
        }
    }

    #[test]
    fn region_checks_name_index_and_field() {
        let ok = region(0, 0x1000, 0x1000, 0);
        let cases: Vec<(RegionDesc, &str)> = vec![
            (region(0x2000, 0, 0x1000, 0), "size"),
            (region(0x2000, 0x1800, 0x1000, 0), "size"),
            (region(0x2800, 0x1000, 0x1000, 0), "gpa"),
            (region(0x2000, 0x1000, 0x1001, 0), "host_addr"),
            (region(0x2000, 0x1000, 0x1000, 8), "file_offset"),
            (region(u64::MAX - 0xfff, 0x2000, 0x1000, 0), "size"),
            (region(0x2000, 0x2000, u64::MAX - 0xfff, 0), "size"),
            (region(0x2000, 0x2000, 0, u64::MAX - 0xfff), "size"),
            // Overlaps region 0 (which ends at 0x1000)...
            (region(0, 0x1000, 0x1000, 0), "gpa"),
        ];
        for (bad, field) in cases {
            let e = decode_err(&hello_with(vec![ok, bad]));
            assert_eq!(field_of(&e), (Some(1), field), "{bad:?}: {e}");
            assert!(e.to_string().contains("Hello region 1"), "{e}");
        }
        // ...and touching it is fine.
        let b = hello_with(vec![ok, region(0x1000, 0x1000, 0, 0x1000)]);
        assert!(decode(&b).unwrap().is_some());
        // Unsorted.
        let e = decode_err(&hello_with(vec![region(0x10000, 0x1000, 0, 0), ok]));
        assert_eq!(field_of(&e), (Some(1), "gpa"));
    }

    #[test]
    fn counts() {
        let e = decode_err(&hello_with(vec![]));
        assert!(matches!(
            e,
            WireError::BadCount {
                field: "region_count",
                count: 0,
                max: 64
            }
        ));
        let many: Vec<_> = (0..65).map(|i| region(i * 0x1000, 0x1000, 0, 0)).collect();
        assert!(matches!(
            decode_err(&hello_with(many.clone())),
            WireError::BadCount {
                field: "region_count",
                count: 65,
                ..
            }
        ));
        assert!(decode(&hello_with(many[..64].to_vec())).unwrap().is_some());
        let remap = |n: u64| {
            Message::Remap(Remap {
                seq: 0,
                region: 0,
                runs: (0..n)
                    .map(|i| RemapRun {
                        first_page: i,
                        pages: 1,
                        target: RemapTo::Zero,
                    })
                    .collect(),
            })
        };
        assert!(matches!(
            decode_err(&frame(&remap(0))),
            WireError::BadCount {
                field: "run_count",
                count: 0,
                ..
            }
        ));
        assert!(matches!(
            decode_err(&frame(&remap(4097))),
            WireError::BadCount {
                field: "run_count",
                count: 4097,
                max: 4096
            }
        ));
        let full = frame(&remap(4096));
        assert_eq!(decode(&full).unwrap().map(|(m, _)| m), Some(remap(4096)));
        assert!(remap(4097).validate().is_err());
        let restore = Message::Restore(Restore {
            seq: 0,
            region: 0,
            runs: vec![],
        });
        assert!(matches!(
            decode_err(&frame(&restore)),
            WireError::BadCount {
                field: "run_count",
                ..
            }
        ));
        let long = Message::Error(ErrorMsg {
            code: 1,
            text: "x".repeat(4097),
        });
        assert!(matches!(
            decode_err(&frame(&long)),
            WireError::BadCount {
                field: "len",
                count: 4097,
                max: 4096
            }
        ));
        assert!(long.validate().is_err());
        // The constructor cuts at a character boundary instead.
        let cut = ErrorMsg::new(1, &"é".repeat(3000));
        assert_eq!(cut.text.len(), 4096);
        assert!(decode(&frame(&Message::Error(cut))).unwrap().is_some());
        let cut = ErrorMsg::new(1, &format!("x{}", "é".repeat(3000)));
        assert_eq!(cut.text.len(), 4095);
    }

    fn remap_runs(runs: Vec<RemapRun>) -> Vec<u8> {
        frame(&Message::Remap(Remap {
            seq: 5,
            region: 0,
            runs,
        }))
    }

    fn run(first_page: u64, pages: u64, target: RemapTo) -> RemapRun {
        RemapRun {
            first_page,
            pages,
            target,
        }
    }

    #[test]
    fn run_checks_name_index_and_field() {
        let z = RemapTo::Zero;
        let ok = run(0, 4, z);
        let cases = vec![
            (run(4, 0, z), "pages"),
            (run(u64::MAX, 1, z), "pages"),
            (run(1, u64::MAX / 4096, z), "pages"),
            (run(3, 1, z), "first_page"),
            (run(4, 1, RemapTo::Shared { file_offset: 0x10 }), "target"),
            (
                run(
                    4,
                    4,
                    RemapTo::Shared {
                        file_offset: u64::MAX - 0x2fff,
                    },
                ),
                "target",
            ),
        ];
        for (bad, field) in cases {
            let e = decode_err(&remap_runs(vec![ok, bad]));
            assert_eq!(field_of(&e), (Some(1), field), "{bad:?}: {e}");
            assert!(e.to_string().contains("Remap 1"), "{e}");
        }
        let restore = |runs: Vec<PageRun>| {
            frame(&Message::Restore(Restore {
                seq: 0,
                region: 0,
                runs,
            }))
        };
        let pr = |first_page, pages| PageRun { first_page, pages };
        let e = decode_err(&restore(vec![pr(10, 1), pr(5, 1)]));
        assert_eq!(field_of(&e), (Some(1), "first_page"));
        let e = decode_err(&restore(vec![pr(10, 0)]));
        assert_eq!(field_of(&e), (Some(0), "pages"));
    }

    #[test]
    fn bad_utf8() {
        let mut b = Vec::new();
        put_u32(&mut b, 1);
        put_u32(&mut b, 2);
        b.extend_from_slice(&[0xc3, 0x28]);
        assert!(matches!(
            decode_err(&raw(kind::ERROR, &b)),
            WireError::BadUtf8
        ));
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let region = (0u64..4, 1u64..64, any::<u32>(), any::<u32>());
        let hello = (
            (any::<bool>(), any::<bool>(), any::<u64>()),
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(region, 1..=64),
        )
            .prop_map(
                |((second_mapper, break_on_write, exclude), domain, vm_tag, rs)| {
                    let n_regions = rs.len();
                    let mask = if n_regions >= 64 {
                        u64::MAX
                    } else {
                        (1u64 << n_regions) - 1
                    };
                    let mut at = 0u64;
                    let regions = rs
                        .into_iter()
                        .map(|(gap, pages, host, off)| {
                            let gpa = at + gap * 4096;
                            at = gpa + pages * 4096;
                            region_desc(
                                gpa,
                                pages * 4096,
                                u64::from(host) << 12,
                                u64::from(off) << 12,
                            )
                        })
                        .collect();
                    let exclude_regions = exclude & mask;
                    Message::Hello(Hello {
                        second_mapper,
                        break_on_write,
                        exclude_regions,
                        domain,
                        vm_tag,
                        regions,
                    })
                },
            );
        let status = prop_oneof![
            Just(AckStatus::Done),
            Just(AckStatus::Skipped),
            Just(AckStatus::Failed)
        ];
        let ack = (any::<u64>(), status, any::<u32>())
            .prop_map(|(seq, status, errno)| Message::Ack(Ack { seq, status, errno }));
        let runs =
            prop::collection::vec((0u64..8, 1u64..16, prop::option::of(any::<u32>())), 1..200);
        let remap = (any::<u64>(), any::<u32>(), runs.clone()).prop_map(|(seq, region, rs)| {
            let mut at = 0;
            let runs = rs
                .into_iter()
                .map(|(gap, pages, target)| {
                    let first_page = at + gap;
                    at = first_page + pages;
                    RemapRun {
                        first_page,
                        pages,
                        target: match target {
                            Some(t) => RemapTo::Shared {
                                file_offset: u64::from(t) << 12,
                            },
                            None => RemapTo::Zero,
                        },
                    }
                })
                .collect();
            Message::Remap(Remap { seq, region, runs })
        });
        let restore = (any::<u64>(), any::<u32>(), runs).prop_map(|(seq, region, rs)| {
            let mut at = 0;
            let runs = rs
                .into_iter()
                .map(|(gap, pages, _)| {
                    let first_page = at + gap;
                    at = first_page + pages;
                    PageRun { first_page, pages }
                })
                .collect();
            Message::Restore(Restore { seq, region, runs })
        });
        let home = restore.clone().prop_map(|m| match m {
            Message::Restore(r) => Message::Home(r),
            other => other,
        });
        let brk = (any::<u32>(), any::<u64>())
            .prop_map(|(region, page)| Message::Break(Break { region, page }));
        let error = (any::<u32>(), ".{0,300}")
            .prop_map(|(code, text)| Message::Error(ErrorMsg::new(code, &text)));
        prop_oneof![
            hello,
            ack,
            Just(Message::Bye),
            any::<u64>().prop_map(|vm_id| Message::Welcome(Welcome { vm_id })),
            remap,
            restore,
            home,
            brk,
            Just(Message::Ready),
            error,
        ]
    }

    fn region_desc(gpa: u64, size: u64, host: u64, off: u64) -> RegionDesc {
        region(gpa, size, host, off)
    }

    proptest! {
        #[test]
        fn generated_messages_round_trip(msg in arb_message()) {
            prop_assert!(msg.validate().is_ok());
            let bytes = frame(&msg);
            prop_assert_eq!(decode(&bytes).unwrap(), Some((msg, bytes.len())));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut at = 0;
            while let Ok(Some((msg, n))) = decode(&bytes[at..]) {
                prop_assert!(n >= HEADER_LEN);
                prop_assert_eq!(decode(&frame(&msg)).unwrap(), Some((msg, n)));
                at += n;
            }
        }

        #[test]
        fn damaged_frames_never_panic(
            msg in arb_message(),
            at in any::<prop::sample::Index>(),
            x in 1u8..,
        ) {
            let mut bytes = frame(&msg);
            let i = at.index(bytes.len());
            bytes[i] ^= x;
            if let Ok(Some((got, n))) = decode(&bytes) {
                prop_assert_eq!(decode(&frame(&got)).unwrap(), Some((got, n)));
            }
        }
    }
}
