//! The receiving end: [`StreamReader`] reads a stream from any
//! `std::io::Read`, checks each chunk whole (length bounds, checksum, every
//! record parsed and checked against the layout) before applying any of it
//! to a [`GuestMemory`], and keeps the receiver's content index.
//!
//! Nothing read from the stream sizes an allocation unchecked: the region
//! count and guest size are checked against [`ReaderLimits`] before memory
//! is created, and chunk buffers grow with the bytes actually received, up
//! to [`MAX_CHUNK`](super::format::MAX_CHUNK).

use std::{
    io::{ErrorKind, Read},
    sync::Arc,
};

use crate::{
    addr::{GuestFrame, GuestPhysAddr, PAGE_SIZE},
    frames::FrameStore,
    memory::{AccessError, GuestMemory},
};

use super::{
    digest::memory_digest,
    error::{Malformed, Position, StreamError},
    format::{self, Layout, Record},
    index::ContentIndex,
    xbzrle,
};

/// What a reader accepts from a stream before it creates any memory.
#[derive(Clone, Copy, Debug)]
pub struct ReaderLimits {
    /// Most guest memory a layout may describe (set it to the VM's size).
    pub max_guest_bytes: u64,
    /// Most regions a layout may have.
    pub max_regions: u32,
}

impl Default for ReaderLimits {
    fn default() -> Self {
        ReaderLimits {
            max_guest_bytes: 64 << 30,
            max_regions: 4096,
        }
    }
}

/// The stream's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    /// Format version.
    pub version: u16,
    /// Header flags (none defined in version 1).
    pub flags: u16,
    /// Page size in bytes.
    pub page_size: u32,
    /// The content-hash seed.
    pub seed: u64,
    /// `(start, size)` per region, sorted.
    pub layout: Vec<(GuestPhysAddr, u64)>,
}

/// One record, applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A round began.
    Round(u32),
    /// `pages` pages from `gpa` became zero.
    Zero {
        /// First page.
        gpa: GuestPhysAddr,
        /// Pages in the run.
        pages: u32,
    },
    /// A page arrived whole.
    Full {
        /// The page.
        gpa: GuestPhysAddr,
    },
    /// A page was copied from a page holding the same content.
    Ref {
        /// The page.
        gpa: GuestPhysAddr,
        /// The page it was copied from.
        from: GuestPhysAddr,
    },
    /// A run of pages was copied from pages holding the same content.
    RefRun {
        /// First page.
        gpa: GuestPhysAddr,
        /// First page copied from.
        from: GuestPhysAddr,
        /// Pages in the run.
        pages: u32,
    },
    /// A delta was applied to a page.
    Delta {
        /// The page.
        gpa: GuestPhysAddr,
        /// Delta bytes.
        len: usize,
    },
    /// The end marker: the memory is complete.
    End {
        /// Pages the stream carried.
        pages: u64,
        /// Whether a whole-memory digest was checked.
        verified: bool,
    },
}

/// What a reader has received so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiveStats {
    /// Bytes read, header included.
    pub bytes: u64,
    /// Chunks read.
    pub chunks: u64,
    /// The last round marker seen.
    pub round: Option<u32>,
    /// Pages zeroed.
    pub zero_pages: u64,
    /// Pages received whole.
    pub full_pages: u64,
    /// Pages received as references.
    pub ref_pages: u64,
    /// Pages received as deltas.
    pub delta_pages: u64,
    /// Whether the end marker's digest was checked.
    pub verified: bool,
}

/// Reads one migration stream. After any error the reader refuses further
/// use ([`StreamError::ReaderFailed`]) and the memory it was filling must
/// be discarded ([`receive`] does that).
#[derive(Debug)]
pub struct StreamReader<R: Read> {
    input: R,
    header: StreamHeader,
    layout: Layout,
    /// The current chunk: its length field, then its payload.
    chunk: Vec<u8>,
    chunk_no: u64,
    chunk_start: u64,
    records: Vec<(usize, Record)>,
    next: usize,
    index: ContentIndex,
    pages: u64,
    stats: ReceiveStats,
    done: bool,
    failed: bool,
}

/// A record before a post-copy switchover.
#[derive(Debug)]
pub(crate) enum Precopy {
    /// A pre-copy record, applied.
    Applied(Event),
    /// Pages to discard (not applied).
    Discard { gpa: GuestPhysAddr, pages: u32 },
    /// The switchover: pages to come, the VMM's state.
    Switchover { needed: u64, state: Vec<u8> },
}

/// A record after a post-copy switchover, not applied.
#[derive(Debug)]
pub(crate) enum Raw {
    /// Pages that are zero.
    Zero { gpa: GuestPhysAddr, pages: u32 },
    /// A whole page: its bytes at `at` of the current chunk.
    Full {
        gpa: GuestPhysAddr,
        at: std::ops::Range<usize>,
    },
    /// The end marker (page count checked).
    End,
}

/// Reads a whole stream into new guest memory created from its layout. On
/// any error the partial memory is dropped (its frames go back to the host).
pub fn receive<R: Read>(
    input: R,
    limits: ReaderLimits,
) -> Result<(GuestMemory, ReceiveStats), StreamError> {
    let mut reader = StreamReader::new(input, limits)?;
    let mem = reader.create_memory()?;
    let stats = reader.apply_all(&mem, |_| {})?;
    Ok((mem, stats))
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the header.
    /// A post-copy stream (`FLAG_POSTCOPY`) is refused here
    /// ([`StreamError::UnsupportedFlags`]): `receive_postcopy` reads those.
    pub fn new(input: R, limits: ReaderLimits) -> Result<Self, StreamError> {
        Self::with_flags(input, limits, 0)
    }

    /// [`new`](Self::new) accepting the header flags `accept`.
    pub(crate) fn with_flags(
        input: R,
        limits: ReaderLimits,
        accept: u16,
    ) -> Result<Self, StreamError> {
        let mut r = StreamReader {
            input,
            header: StreamHeader {
                version: 0,
                flags: 0,
                page_size: 0,
                seed: 0,
                layout: Vec::new(),
            },
            layout: Layout::new(&[(GuestPhysAddr(0), PAGE_SIZE as u64)])?,
            chunk: Vec::new(),
            chunk_no: 0,
            chunk_start: 0,
            records: Vec::new(),
            next: 0,
            index: ContentIndex::default(),
            pages: 0,
            stats: ReceiveStats::default(),
            done: false,
            failed: false,
        };
        r.read_header(limits, accept)?;
        Ok(r)
    }

    /// The header.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// What has been received so far.
    pub fn stats(&self) -> ReceiveStats {
        self.stats
    }

    /// New guest memory with the stream's layout.
    pub fn create_memory(&self) -> Result<GuestMemory, StreamError> {
        Ok(GuestMemory::new(&self.header.layout)?)
    }

    /// New guest memory with the stream's layout on `store` (so a dedup
    /// host of that store can fold it).
    pub fn create_memory_in(&self, store: Arc<FrameStore>) -> Result<GuestMemory, StreamError> {
        Ok(GuestMemory::with_store(store, &self.header.layout)?)
    }

    /// Applies every remaining record to `mem`, calling `progress` after
    /// each, up to the end marker.
    pub fn apply_all(
        &mut self,
        mem: &GuestMemory,
        mut progress: impl FnMut(&Event),
    ) -> Result<ReceiveStats, StreamError> {
        while let Some(ev) = self.next_event(mem)? {
            progress(&ev);
        }
        Ok(self.stats)
    }

    /// Applies the next record to `mem` (memory with the stream's layout,
    /// holding only what this stream wrote) and says what it was; `None`
    /// after the end marker. Reads the next chunk when the current one is
    /// used up; nothing of a chunk is applied unless all of it checks out.
    pub fn next_event(&mut self, mem: &GuestMemory) -> Result<Option<Event>, StreamError> {
        if self.failed {
            return Err(StreamError::ReaderFailed);
        }
        if self.done {
            return Ok(None);
        }
        let r = self.step(mem);
        if r.is_err() {
            self.failed = true;
        }
        r.map(Some)
    }

    /// One step: the next record (reading the next chunk when the current
    /// one is used up), dispatched by its kind to the step that applies it.
    fn step(&mut self, mem: &GuestMemory) -> Result<Event, StreamError> {
        let RecordAt { at, rec } = self.next_record()?;
        match rec {
            Record::Round(n) => {
                self.stats.round = Some(n);
                Ok(Event::Round(n))
            }
            Record::Zero { gpa, pages } => self.apply_zero(mem, at, gpa, pages),
            Record::Full { gpa, data } => self.apply_full(mem, at, gpa, data),
            Record::Ref { gpa, hash } => self.apply_ref(mem, at, gpa, hash),
            Record::RefRun { gpa, from, pages } => self.apply_ref_run(mem, at, gpa, from, pages),
            Record::Delta {
                gpa,
                check,
                data,
                len,
            } => self.apply_delta(mem, at, gpa, check, self.payload(data, len)),
            Record::End { pages, digest } => self.apply_end(mem, at, pages, digest),
            Record::Discard { .. } | Record::Switchover { .. } => Err(StreamError::Malformed {
                at,
                problem: Malformed::PostcopyRecord,
            }),
        }
    }

    /// Before the switchover of a post-copy stream: applies the next
    /// record to `mem` as [`next_event`](Self::next_event) does, or hands
    /// back a DISCARD or SWITCHOVER record (not applied).
    pub(crate) fn next_precopy(&mut self, mem: &GuestMemory) -> Result<Precopy, StreamError> {
        if self.failed {
            return Err(StreamError::ReaderFailed);
        }
        let r = self.precopy_step(mem);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn precopy_step(&mut self, mem: &GuestMemory) -> Result<Precopy, StreamError> {
        if self.next < self.records.len() || !self.done {
            if self.next == self.records.len() {
                self.read_chunk()?;
            }
            match self.records.get(self.next) {
                Some(&(_, Record::Discard { gpa, pages })) => {
                    self.next += 1;
                    return Ok(Precopy::Discard { gpa, pages });
                }
                Some(&(_, Record::Switchover { needed, state, len })) => {
                    self.next += 1;
                    let p = self.payload(state, len);
                    let state = self.chunk.get(p.start..p.end).unwrap_or(&[]).to_vec();
                    return Ok(Precopy::Switchover { needed, state });
                }
                _ => {}
            }
        }
        self.step(mem).map(Precopy::Applied)
    }

    /// After the switchover: the next record, not applied (the memory is
    /// the fault server's to fill). Only whole pages, zero runs and the
    /// end marker (whose page count is checked) may come.
    pub(crate) fn next_raw(&mut self) -> Result<Raw, StreamError> {
        if self.failed {
            return Err(StreamError::ReaderFailed);
        }
        let r = self.raw_step();
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn raw_step(&mut self) -> Result<Raw, StreamError> {
        let RecordAt { at, rec } = self.next_record()?;
        let bad = |k: u8| StreamError::Malformed {
            at,
            problem: Malformed::AfterSwitchover(k),
        };
        match rec {
            Record::Zero { gpa, pages } => {
                self.pages += u64::from(pages);
                self.stats.zero_pages += u64::from(pages);
                Ok(Raw::Zero { gpa, pages })
            }
            Record::Full { gpa, data } => {
                self.pages += 1;
                self.stats.full_pages += 1;
                let p = self.payload(data, PAGE_SIZE);
                Ok(Raw::Full {
                    gpa,
                    at: p.start..p.end,
                })
            }
            Record::End {
                pages,
                digest: None,
            } => {
                if pages != self.pages {
                    return Err(StreamError::Malformed {
                        at,
                        problem: Malformed::PageCount {
                            claimed: pages,
                            seen: self.pages,
                        },
                    });
                }
                self.done = true;
                Ok(Raw::End)
            }
            Record::End { .. } => Err(bad(format::kind::END)),
            Record::Round(_) => Err(bad(format::kind::ROUND)),
            Record::Ref { .. } => Err(bad(format::kind::REF)),
            Record::RefRun { .. } => Err(bad(format::kind::REF_RUN)),
            Record::Delta { .. } => Err(bad(format::kind::DELTA)),
            Record::Discard { .. } => Err(bad(format::kind::DISCARD)),
            Record::Switchover { .. } => Err(bad(format::kind::SWITCHOVER)),
        }
    }

    /// The bytes of the current chunk at `at` (from [`Raw::Full`]).
    pub(crate) fn chunk_bytes(&self, at: std::ops::Range<usize>) -> &[u8] {
        self.chunk.get(at).unwrap_or(&[])
    }

    /// The next record of the current chunk, with its place in the stream;
    /// reads, checks and parses the next chunk first when this one is used
    /// up.
    fn next_record(&mut self) -> Result<RecordAt, StreamError> {
        if self.next == self.records.len() {
            self.read_chunk()?;
        }
        let Some(&(off, rec)) = self.records.get(self.next) else {
            // A checked chunk has at least one record; be safe anyway.
            return Err(StreamError::Malformed {
                at: Position {
                    offset: self.chunk_start,
                    chunk: self.chunk_no.saturating_sub(1),
                    record: 0,
                },
                problem: Malformed::CutOff,
            });
        };
        let at = Position {
            offset: self.chunk_start + 4 + off as u64,
            chunk: self.chunk_no.saturating_sub(1),
            #[allow(clippy::cast_possible_truncation)] // records per chunk < 2^20
            record: self.next as u32,
        };
        self.next += 1;
        Ok(RecordAt { at, rec })
    }

    /// `len` payload bytes at offset `data` of the current chunk's records
    /// (checked against the chunk when it was parsed).
    fn payload(&self, data: usize, len: usize) -> PayloadRange {
        PayloadRange {
            start: 4 + data,
            end: 4 + data + len,
        }
    }

    /// A ZERO record: `pages` pages from `gpa` become zero (released on a
    /// 4 KiB store, filled on a hugetlb one).
    fn apply_zero(
        &mut self,
        mem: &GuestMemory,
        at: Position,
        gpa: GuestPhysAddr,
        pages: u32,
    ) -> Result<Event, StreamError> {
        let len = u64::from(pages) * PAGE_SIZE as u64;
        let store = mem.frame_store();
        // Anonymous memory has no frames to release: filled instead.
        if store.has_file() && store.granule().bytes() == PAGE_SIZE as u64 {
            mem.discard(gpa, len).map_err(access(at))?;
        } else {
            #[allow(clippy::cast_possible_truncation)] // inside a region
            mem.fill(gpa, 0, len as usize).map_err(access(at))?;
        }
        self.index.clear_range(gpa.frame(), u64::from(pages));
        self.pages += u64::from(pages);
        self.stats.zero_pages += u64::from(pages);
        Ok(Event::Zero { gpa, pages })
    }

    /// A FULL record: the page's bytes are at offset `data` of the chunk.
    fn apply_full(
        &mut self,
        mem: &GuestMemory,
        at: Position,
        gpa: GuestPhysAddr,
        data: usize,
    ) -> Result<Event, StreamError> {
        let mut page = [0u8; PAGE_SIZE];
        let r = self.payload(data, PAGE_SIZE);
        page.copy_from_slice(&self.chunk[r.start..r.end]);
        mem.write(gpa, &page).map_err(access(at))?;
        self.index.set(
            gpa.frame(),
            Some(format::content_hash(&page, self.header.seed)),
        );
        self.pages += 1;
        self.stats.full_pages += 1;
        Ok(Event::Full { gpa })
    }

    /// A REF record: the page gets content `hash`, which a page this end's
    /// index names holds.
    fn apply_ref(
        &mut self,
        mem: &GuestMemory,
        at: Position,
        gpa: GuestPhysAddr,
        hash: u128,
    ) -> Result<Event, StreamError> {
        let from = self
            .index
            .holder(hash)
            .ok_or(StreamError::UnknownRef { at, hash })?
            .addr();
        let mut page = [0u8; PAGE_SIZE];
        mem.read(from, &mut page).map_err(access(at))?;
        // Second check: the page we copy from still holds the content (a
        // desync between the two ends' indexes is an error here, never a
        // silently wrong page).
        if format::content_hash(&page, self.header.seed) != hash {
            return Err(StreamError::ContentMismatch { at, gpa: from });
        }
        mem.write(gpa, &page).map_err(access(at))?;
        self.index.set(gpa.frame(), Some(hash));
        self.pages += 1;
        self.stats.ref_pages += 1;
        Ok(Event::Ref { gpa, from })
    }

    /// A REF_RUN record: page `gpa + i` gets what page `from + i` holds.
    fn apply_ref_run(
        &mut self,
        mem: &GuestMemory,
        at: Position,
        gpa: GuestPhysAddr,
        from: GuestPhysAddr,
        pages: u32,
    ) -> Result<Event, StreamError> {
        let mut page = [0u8; PAGE_SIZE];
        // One page after the other, each checked against what this end's
        // index says its source holds at that moment (the sender chose each
        // source from the same index state).
        for i in 0..u64::from(pages) {
            let dst = GuestFrame(gpa.frame().0 + i);
            let src = GuestFrame(from.frame().0 + i);
            let src_gpa = src.addr();
            let want = self
                .index
                .content_of(src)
                .ok_or(StreamError::UnknownSource { at, gpa: src_gpa })?;
            mem.read(src_gpa, &mut page).map_err(access(at))?;
            if format::content_hash(&page, self.header.seed) != want {
                return Err(StreamError::ContentMismatch { at, gpa: src_gpa });
            }
            if dst != src {
                mem.write(dst.addr(), &page).map_err(access(at))?;
            }
            self.index.set(dst, Some(want));
        }
        self.pages += u64::from(pages);
        self.stats.ref_pages += u64::from(pages);
        Ok(Event::RefRun { gpa, from, pages })
    }

    /// A DELTA record: the XBZRLE delta in `delta` applied to the page this
    /// end holds, checked against the low half of the content hash.
    fn apply_delta(
        &mut self,
        mem: &GuestMemory,
        at: Position,
        gpa: GuestPhysAddr,
        check: u64,
        delta: PayloadRange,
    ) -> Result<Event, StreamError> {
        let mut page = [0u8; PAGE_SIZE];
        mem.read(gpa, &mut page).map_err(access(at))?;
        xbzrle::apply(&self.chunk[delta.start..delta.end], &mut page).map_err(|e| {
            StreamError::Malformed {
                at,
                problem: Malformed::Delta(e),
            }
        })?;
        let hash = format::content_hash(&page, self.header.seed);
        #[allow(clippy::cast_possible_truncation)] // the low half, by design
        if hash as u64 != check {
            return Err(StreamError::ContentMismatch { at, gpa });
        }
        mem.write(gpa, &page).map_err(access(at))?;
        self.index.set(gpa.frame(), Some(hash));
        self.pages += 1;
        self.stats.delta_pages += 1;
        Ok(Event::Delta {
            gpa,
            len: delta.end - delta.start,
        })
    }

    /// The end marker: the page count must match what arrived, and the
    /// whole-memory digest (if any) what was rebuilt.
    fn apply_end(
        &mut self,
        mem: &GuestMemory,
        at: Position,
        pages: u64,
        digest: Option<u128>,
    ) -> Result<Event, StreamError> {
        if pages != self.pages {
            return Err(StreamError::Malformed {
                at,
                problem: Malformed::PageCount {
                    claimed: pages,
                    seen: self.pages,
                },
            });
        }
        if let Some(d) = digest {
            if memory_digest(mem, self.header.seed).map_err(access(at))? != d {
                return Err(StreamError::DigestMismatch);
            }
        }
        self.done = true;
        self.stats.verified = digest.is_some();
        Ok(Event::End {
            pages,
            verified: digest.is_some(),
        })
    }

    fn read_header(&mut self, limits: ReaderLimits, accept: u16) -> Result<(), StreamError> {
        const WHAT: &str = "the header";
        let mut fixed = [0u8; format::FIXED_HEADER];
        self.fill_exact(&mut fixed[..8], WHAT)?;
        if fixed[..8] != format::MAGIC {
            let mut found = [0u8; 8];
            found.copy_from_slice(&fixed[..8]);
            return Err(StreamError::BadMagic { found });
        }
        self.fill_exact(&mut fixed[8..10], WHAT)?;
        let version = u16::from_le_bytes([fixed[8], fixed[9]]);
        if version != format::VERSION {
            return Err(StreamError::UnsupportedVersion {
                found: version,
                supported: format::VERSION,
            });
        }
        self.fill_exact(&mut fixed[10..], WHAT)?;
        let mut f = Fields(&fixed[10..]);
        let (flags, page_size, seed, count) = (f.u16(), f.u32(), f.u64(), f.u32());
        if flags & !(accept & format::KNOWN_FLAGS) != 0 {
            return Err(StreamError::UnsupportedFlags { flags });
        }
        if page_size != format::PAGE_SIZE_U32 {
            return Err(StreamError::UnsupportedPageSize { found: page_size });
        }
        if count > limits.max_regions {
            return Err(StreamError::TooManyRegions {
                count,
                max: limits.max_regions,
            });
        }
        // Bounded by `max_regions`, checked above.
        let mut rest = vec![0u8; count as usize * 16 + 8];
        self.fill_exact(&mut rest, WHAT)?;
        let (regions, sum) = rest.split_at(count as usize * 16);
        let mut f = Fields(sum);
        let mut h = xxhash_rust::xxh3::Xxh3Default::new();
        h.update(&fixed);
        h.update(regions);
        if h.digest() != f.u64() {
            return Err(StreamError::HeaderChecksum {
                at: self.stats.bytes - 8,
            });
        }
        let mut f = Fields(regions);
        let layout: Vec<_> = (0..count)
            .map(|_| (GuestPhysAddr(f.u64()), f.u64()))
            .collect();
        self.layout = Layout::new(&layout)?;
        let bytes = self.layout.total_bytes();
        if bytes > limits.max_guest_bytes {
            return Err(StreamError::TooLarge {
                bytes,
                max: limits.max_guest_bytes,
            });
        }
        self.header = StreamHeader {
            version,
            flags,
            page_size,
            seed,
            layout: self.layout.regions(),
        };
        Ok(())
    }

    /// Reads, checks and parses the next chunk.
    fn read_chunk(&mut self) -> Result<(), StreamError> {
        self.chunk_start = self.stats.bytes;
        let pos = Position {
            offset: self.chunk_start,
            chunk: self.chunk_no,
            record: 0,
        };
        let mut len = [0u8; 4];
        self.fill_exact(&mut len, "a chunk length (no end marker yet)")?;
        let len32 = u32::from_le_bytes(len);
        if len32 == 0 || len32 > format::MAX_CHUNK {
            return Err(StreamError::ChunkLength {
                at: pos,
                len: len32,
                max: format::MAX_CHUNK,
            });
        }
        let mut chunk = std::mem::take(&mut self.chunk);
        chunk.clear();
        chunk.extend_from_slice(&len);
        // Grows with the bytes that arrive, not with the length claimed.
        let got = (&mut self.input)
            .take(u64::from(len32))
            .read_to_end(&mut chunk);
        self.chunk = chunk;
        let got = got.map_err(|source| StreamError::Io {
            at: self.stats.bytes,
            source,
        })?;
        self.stats.bytes += got as u64;
        if got < len32 as usize {
            return Err(StreamError::Truncated {
                at: self.stats.bytes,
                what: "a chunk's records",
            });
        }
        let mut sum = [0u8; 8];
        self.fill_exact(&mut sum, "a chunk checksum")?;
        let found = u64::from_le_bytes(sum);
        let computed = format::chunk_checksum(&self.chunk, self.header.seed, self.chunk_no);
        if found != computed {
            return Err(StreamError::ChunkChecksum {
                at: pos,
                found,
                computed,
            });
        }
        format::parse_chunk(
            &self.chunk[4..],
            &self.layout,
            self.stats.round,
            self.header.flags & format::FLAG_POSTCOPY != 0,
            &mut self.records,
        )
        .map_err(|(record, off, problem)| StreamError::Malformed {
            at: Position {
                offset: self.chunk_start + 4 + off as u64,
                chunk: self.chunk_no,
                record,
            },
            problem,
        })?;
        self.chunk_no += 1;
        self.stats.chunks += 1;
        self.next = 0;
        Ok(())
    }

    /// `read_exact` that counts bytes and names a short read.
    fn fill_exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), StreamError> {
        let mut got = 0;
        while got < buf.len() {
            match self.input.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(StreamError::Truncated {
                        at: self.stats.bytes,
                        what,
                    })
                }
                Ok(n) => {
                    got += n;
                    self.stats.bytes += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(StreamError::Io {
                        at: self.stats.bytes,
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

/// Little-endian fields from a slice already known to be long enough.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let n = N.min(self.0.len());
        a[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        a
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

/// A record of the current chunk and its place in the stream: what
/// [`StreamReader::next_record`] hands the step that applies it.
#[derive(Clone, Copy, Debug)]
struct RecordAt {
    at: Position,
    rec: Record,
}

/// Where a record's payload lies in the current chunk buffer (length field
/// included), so a step can borrow it while it updates the reader.
#[derive(Clone, Copy, Debug)]
struct PayloadRange {
    start: usize,
    end: usize,
}

/// Maps an access error of the record at `at` to a stream error.
fn access(at: Position) -> impl Fn(AccessError) -> StreamError {
    move |source| StreamError::Access { at, source }
}
