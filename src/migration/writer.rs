//! The sending end: [`StreamWriter`] turns pages into records, chooses the
//! cheapest kind for each, groups records into checksummed chunks and writes
//! them to any `std::io::Write`.

use std::io::Write;

use crate::{
    addr::{is_zero_page, GuestFrame, GuestPhysAddr, PAGE_SIZE},
    memory::GuestMemory,
};

use super::{
    cache::PageCache,
    digest::memory_digest,
    error::{Position, StreamError},
    format::{self, kind, Layout},
    index::ContentIndex,
    xbzrle,
};

/// Settings of a [`StreamWriter`].
#[derive(Clone, Copy, Debug)]
pub struct WriterOptions {
    /// Target chunk payload in bytes, clamped to
    /// [`MIN_CHUNK`](format::MIN_CHUNK)..=[`MAX_CHUNK`](format::MAX_CHUNK).
    /// A chunk is the unit of corruption detection: the receiver applies
    /// nothing from a chunk until it has all of it and its checksum matches.
    pub chunk_bytes: u32,
    /// Pages whose last-sent copy is kept for deltas (an LRU, like QEMU's
    /// XBZRLE cache); 0 turns deltas off. Each costs a page of memory.
    pub delta_cache_pages: usize,
    /// Pages sent in this round or later enter the delta cache (round 0
    /// sends everything once; pages sent again are the ones that change).
    pub delta_from_round: u32,
    /// The content-hash seed; `None` draws a random one (what a real
    /// migration wants: the guest cannot know it, so it cannot craft
    /// colliding pages). Tests fix it to get reproducible streams.
    pub seed: Option<u64>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            chunk_bytes: 256 << 10,
            delta_cache_pages: 16 << 10, // 64 MiB, QEMU's default cache size
            delta_from_round: 1,
            seed: None,
        }
    }
}

/// How a page was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// As a zero-page record (no payload).
    Zero,
    /// Whole.
    Full,
    /// As a reference to content the receiver already holds.
    Ref,
    /// As a delta of this many bytes against the receiver's copy.
    Delta(usize),
    /// Not at all: the receiver already holds exactly this content there.
    Unchanged,
}

/// What a writer has sent so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Bytes written to the output, header included.
    pub bytes: u64,
    /// Chunks written.
    pub chunks: u64,
    /// Pages sent as zero records.
    pub zero_pages: u64,
    /// Pages sent whole.
    pub full_pages: u64,
    /// Pages sent as references.
    pub ref_pages: u64,
    /// Pages sent as deltas.
    pub delta_pages: u64,
    /// Delta payload bytes.
    pub delta_bytes: u64,
    /// Pages not sent because the receiver held them already.
    pub unchanged_pages: u64,
    /// Distinct contents the receiver holds (the reference index).
    pub indexed_contents: u64,
}

/// The open reference run at the end of the chunk being built.
#[derive(Clone, Copy, Debug)]
struct RefRun {
    /// Offset of the record in the chunk.
    at: usize,
    /// The page the run would cover next, and its region's end.
    next_dst: GuestFrame,
    dst_end: GuestFrame,
    /// The page it would copy that one from, and its region's end.
    next_src: GuestFrame,
    src_end: GuestFrame,
    pages: u32,
}

/// Writes one migration stream. Keeps the content index (to send repeated
/// content as references) and the delta cache; a stream is one migration
/// attempt, and after any error the writer refuses further use
/// ([`StreamError::WriterFailed`]): retry with a new stream.
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    out: W,
    layout: Layout,
    opts: WriterOptions,
    seed: u64,
    /// The chunk being built: a 4-byte length placeholder, then records.
    chunk: Vec<u8>,
    chunk_no: u64,
    /// The last record is a zero run: (offset in `chunk`, next frame,
    /// region end frame, pages).
    zero_run: Option<(usize, GuestFrame, GuestFrame, u32)>,
    /// The last record is a reference run that may grow.
    ref_run: Option<RefRun>,
    round: Option<u32>,
    index: ContentIndex,
    cache: PageCache,
    pages: u64,
    stats: WriterStats,
    failed: bool,
}

impl<W: Write> StreamWriter<W> {
    /// Starts a stream for guest memory of this layout (as given to
    /// [`GuestMemory::new`]) and writes its header.
    pub fn new(
        out: W,
        layout: &[(GuestPhysAddr, u64)],
        opts: WriterOptions,
    ) -> Result<Self, StreamError> {
        Self::with_flags(out, layout, opts, 0)
    }

    /// [`new`](Self::new) with header flags (`FLAG_POSTCOPY`).
    pub(crate) fn with_flags(
        out: W,
        layout: &[(GuestPhysAddr, u64)],
        mut opts: WriterOptions,
        flags: u16,
    ) -> Result<Self, StreamError> {
        let layout = Layout::new(layout)?;
        let seed = match opts.seed {
            Some(s) => s,
            None => getrandom::u64().map_err(StreamError::Random)?,
        };
        opts.chunk_bytes = opts.chunk_bytes.clamp(format::MIN_CHUNK, format::MAX_CHUNK);
        let mut header = Vec::new();
        format::encode_header(&mut header, seed, flags, &layout);
        let sum = format::header_checksum(&header);
        header.extend_from_slice(&sum.to_le_bytes());
        let mut w = StreamWriter {
            out,
            layout,
            seed,
            chunk: Vec::with_capacity(opts.chunk_bytes as usize + 4),
            chunk_no: 0,
            zero_run: None,
            ref_run: None,
            round: None,
            index: ContentIndex::default(),
            cache: PageCache::new(opts.delta_cache_pages),
            pages: 0,
            stats: WriterStats::default(),
            failed: false,
            opts,
        };
        w.write_out(&header)?;
        w.chunk.extend_from_slice(&[0; 4]);
        Ok(w)
    }

    /// A writer for `mem`'s layout.
    pub fn for_memory(out: W, mem: &GuestMemory, opts: WriterOptions) -> Result<Self, StreamError> {
        Self::for_memory_flags(out, mem, opts, 0)
    }

    /// [`for_memory`](Self::for_memory) with header flags.
    pub(crate) fn for_memory_flags(
        out: W,
        mem: &GuestMemory,
        opts: WriterOptions,
        flags: u16,
    ) -> Result<Self, StreamError> {
        let layout: Vec<_> = mem
            .regions()
            .iter()
            .map(|r| (r.start(), r.size()))
            .collect();
        Self::with_flags(out, &layout, opts, flags)
    }

    /// Whether the run of `pages` pages from `gpa` lies in one region.
    pub(crate) fn holds_run(&self, gpa: GuestPhysAddr, pages: u32) -> bool {
        self.layout.holds_run(gpa, pages)
    }

    /// A DISCARD record: the receiver's copies of these pages are stale
    /// (written since they were sent); it forgets them, and so does the
    /// content index.
    pub(crate) fn discard(&mut self, gpa: GuestPhysAddr, pages: u32) -> Result<(), StreamError> {
        self.check()?;
        if !self.layout.holds_run(gpa, pages) {
            return Err(StreamError::PageNotInLayout { gpa });
        }
        for i in 0..u64::from(pages) {
            let pfn = GuestFrame(gpa.frame().0 + i);
            self.index.set(pfn, None);
            self.cache.remove(pfn);
        }
        let mut rec = [0u8; format::DISCARD_LEN];
        rec[0] = kind::DISCARD;
        rec[1..9].copy_from_slice(&gpa.0.to_le_bytes());
        rec[9..].copy_from_slice(&pages.to_le_bytes());
        self.push(&[&rec])
    }

    /// The SWITCHOVER record: `needed` pages still to come, and the VMM's
    /// `state` (at most a chunk, less the record head); then flushes.
    pub(crate) fn switchover(&mut self, needed: u64, state: &[u8]) -> Result<(), StreamError> {
        self.check()?;
        let max = self.opts.chunk_bytes as usize - format::SWITCHOVER_HEAD;
        let len = u32::try_from(state.len())
            .ok()
            .filter(|_| state.len() <= max)
            .ok_or(StreamError::StateTooLarge {
                len: state.len(),
                max,
            })?;
        let mut head = [0u8; format::SWITCHOVER_HEAD];
        head[0] = kind::SWITCHOVER;
        head[1..9].copy_from_slice(&needed.to_le_bytes());
        head[9..].copy_from_slice(&len.to_le_bytes());
        self.push(&[&head, state])?;
        self.flush()
    }

    /// [`page_raw`](Self::page_raw) of the page at `gpa` of `mem`.
    pub(crate) fn send_page_raw(
        &mut self,
        mem: &GuestMemory,
        gpa: GuestPhysAddr,
    ) -> Result<(), StreamError> {
        let mut page = [0u8; PAGE_SIZE];
        mem.read(gpa, &mut page)
            .map_err(|source| StreamError::Access {
                at: self.position(),
                source,
            })?;
        self.page_raw(gpa, &page)
    }

    /// After the switchover: sends a page whole, or as zero, never as a
    /// reference or delta (the receiver cannot read its own memory then).
    pub(crate) fn page_raw(
        &mut self,
        gpa: GuestPhysAddr,
        data: &[u8; PAGE_SIZE],
    ) -> Result<(), StreamError> {
        self.check()?;
        if !self.layout.holds_run(gpa, 1) {
            return Err(StreamError::PageNotInLayout { gpa });
        }
        if is_zero_page(data) {
            self.stats.zero_pages += 1;
            return self.zero(gpa.frame());
        }
        let mut head = [0u8; format::FULL_LEN - PAGE_SIZE];
        head[0] = kind::FULL;
        head[1..].copy_from_slice(&gpa.0.to_le_bytes());
        self.push(&[&head, data])?;
        self.stats.full_pages += 1;
        self.pages += 1;
        Ok(())
    }

    /// The stream's content-hash seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// What has been sent so far.
    pub fn stats(&self) -> WriterStats {
        WriterStats {
            indexed_contents: self.index.contents() as u64,
            ..self.stats
        }
    }

    /// Marks the start of round `round` (rounds never go backwards).
    pub fn begin_round(&mut self, round: u32) -> Result<(), StreamError> {
        self.check()?;
        if let Some(before) = self.round {
            if round < before {
                return Err(StreamError::RoundBackwards { before, now: round });
            }
        }
        self.round = Some(round);
        let mut rec = [0u8; format::ROUND_LEN];
        rec[0] = kind::ROUND;
        rec[1..].copy_from_slice(&round.to_le_bytes());
        self.push(&[&rec])
    }

    /// Reads the page at `gpa` from `mem` and sends it.
    pub fn send_page(
        &mut self,
        mem: &GuestMemory,
        gpa: GuestPhysAddr,
    ) -> Result<Sent, StreamError> {
        let mut page = [0u8; PAGE_SIZE];
        // A released or ballooned page is read from its frame, not the
        // mapping (`memory/released.rs`): a hole reads as zeros without
        // shmem allocating it (a review found a migration giving a
        // balloon's pages their memory back).
        mem.read(gpa, &mut page)
            .map_err(|source| StreamError::Access {
                at: self.position(),
                source,
            })?;
        self.page(gpa, &page)
    }

    /// Sends the page at `gpa` (page-aligned, inside the layout) with
    /// content `data`, as the cheapest record the receiver can decode: zero,
    /// a reference to content it holds, a delta against its copy, or whole.
    pub fn page(
        &mut self,
        gpa: GuestPhysAddr,
        data: &[u8; PAGE_SIZE],
    ) -> Result<Sent, StreamError> {
        self.check()?;
        if !self.layout.holds_run(gpa, 1) {
            return Err(StreamError::PageNotInLayout { gpa });
        }
        let pfn = gpa.frame();
        if is_zero_page(data) {
            self.zero(pfn)?;
            self.index.set(pfn, None);
            self.cache.remove(pfn);
            self.stats.zero_pages += 1;
            return Ok(Sent::Zero);
        }
        let hash = format::content_hash(data, self.seed);
        if self.index.content_of(pfn) == Some(hash) {
            self.stats.unchanged_pages += 1;
            return Ok(Sent::Unchanged);
        }
        let sent = if let Some(holder) = self.index.holder(hash) {
            self.reference(pfn, hash, holder)?;
            self.stats.ref_pages += 1;
            Sent::Ref
        } else if let Some(len) = self.try_delta(pfn, hash, data)? {
            self.stats.delta_pages += 1;
            self.stats.delta_bytes += len as u64;
            Sent::Delta(len)
        } else {
            let mut head = [0u8; format::FULL_LEN - PAGE_SIZE];
            head[0] = kind::FULL;
            head[1..].copy_from_slice(&gpa.0.to_le_bytes());
            self.push(&[&head, data])?;
            self.stats.full_pages += 1;
            Sent::Full
        };
        self.pages += 1;
        self.index.set(pfn, Some(hash));
        if self.cache.contains(pfn) || self.round.unwrap_or(0) >= self.opts.delta_from_round {
            self.cache.put(pfn, data);
        }
        Ok(sent)
    }

    /// Ends the current chunk and flushes the output (e.g. at the end of a
    /// round, so the receiver can apply it).
    pub fn flush(&mut self) -> Result<(), StreamError> {
        self.check()?;
        self.end_chunk()?;
        let r = self.out.flush();
        self.io(r)
    }

    /// Writes the end marker and flushes; returns the output and the final
    /// statistics.
    pub fn finish(self) -> Result<(W, WriterStats), StreamError> {
        self.finish_with(None)
    }

    /// As [`finish`](Self::finish), and puts a digest of all of `mem` in the
    /// end marker, which the receiver checks against what it rebuilt: an
    /// end-to-end check that also covers a content-hash collision. Call it
    /// with the vCPUs paused, after the last round (it reads all memory).
    pub fn finish_verified(self, mem: &GuestMemory) -> Result<(W, WriterStats), StreamError> {
        let digest = memory_digest(mem, self.seed).map_err(|source| StreamError::Access {
            at: self.position(),
            source,
        })?;
        self.finish_with(Some(digest))
    }

    fn finish_with(mut self, digest: Option<u128>) -> Result<(W, WriterStats), StreamError> {
        self.check()?;
        let mut rec = [0u8; format::END_LEN + 16];
        rec[0] = kind::END;
        rec[1..9].copy_from_slice(&self.pages.to_le_bytes());
        let len = match digest {
            Some(d) => {
                rec[9] = format::END_DIGEST;
                rec[10..].copy_from_slice(&d.to_le_bytes());
                format::END_LEN + 16
            }
            None => format::END_LEN,
        };
        self.push(&[&rec[..len]])?;
        self.end_chunk()?;
        let r = self.out.flush();
        self.io(r)?;
        let stats = self.stats();
        Ok((self.out, stats))
    }

    /// Tries a delta against the cached copy; `None` if there is none or
    /// the delta is not small enough.
    fn try_delta(
        &mut self,
        pfn: GuestFrame,
        hash: u128,
        data: &[u8; PAGE_SIZE],
    ) -> Result<Option<usize>, StreamError> {
        let Some(old) = self.cache.get(pfn) else {
            return Ok(None);
        };
        let mut rec = Vec::with_capacity(format::DELTA_HEAD + format::DELTA_LIMIT);
        rec.resize(format::DELTA_HEAD, 0);
        let Some(len) = xbzrle::encode(old, data, &mut rec, format::DELTA_LIMIT) else {
            return Ok(None);
        };
        rec[0] = kind::DELTA;
        rec[1..9].copy_from_slice(&pfn.addr().0.to_le_bytes());
        // The low half of the content hash: the receiver checks the page it
        // rebuilt against it.
        #[allow(clippy::cast_possible_truncation)]
        rec[9..17].copy_from_slice(&(hash as u64).to_le_bytes());
        #[allow(clippy::cast_possible_truncation)] // len <= DELTA_LIMIT < 2^16
        rec[17..19].copy_from_slice(&(len as u16).to_le_bytes());
        self.push(&[&rec])?;
        Ok(Some(len))
    }

    /// Sends page `pfn` as a copy of content the receiver holds at
    /// `holder`: extends the open reference run when the page after its
    /// last source holds that content too (clones then cost one record per
    /// stretch), else starts a run of one page (21 bytes).
    fn reference(
        &mut self,
        pfn: GuestFrame,
        hash: u128,
        holder: GuestFrame,
    ) -> Result<(), StreamError> {
        if let Some(mut run) = self.ref_run {
            if run.next_dst == pfn
                && pfn < run.dst_end
                && run.next_src < run.src_end
                && run.pages < u32::MAX
                && self.index.content_of(run.next_src) == Some(hash)
            {
                run.pages += 1;
                run.next_dst.0 += 1;
                run.next_src.0 += 1;
                self.chunk[run.at + 17..run.at + 21].copy_from_slice(&run.pages.to_le_bytes());
                self.ref_run = Some(run);
                return Ok(());
            }
        }
        let mut rec = [0u8; format::REF_RUN_LEN];
        rec[0] = kind::REF_RUN;
        rec[1..9].copy_from_slice(&pfn.addr().0.to_le_bytes());
        rec[9..17].copy_from_slice(&holder.addr().0.to_le_bytes());
        rec[17..].copy_from_slice(&1u32.to_le_bytes());
        self.push(&[&rec])?;
        self.ref_run = Some(RefRun {
            at: self.chunk.len() - format::REF_RUN_LEN,
            next_dst: GuestFrame(pfn.0 + 1),
            dst_end: self.layout.region_end(pfn).unwrap_or(GuestFrame(pfn.0 + 1)),
            next_src: GuestFrame(holder.0 + 1),
            src_end: self
                .layout
                .region_end(holder)
                .unwrap_or(GuestFrame(holder.0 + 1)),
            pages: 1,
        });
        Ok(())
    }

    /// Sends page `pfn` as zero, extending the previous record if it is a
    /// zero run ending just before `pfn` in the same region.
    fn zero(&mut self, pfn: GuestFrame) -> Result<(), StreamError> {
        self.pages += 1;
        if let Some((at, next, end, pages)) = self.zero_run {
            if next == pfn && pfn < end && pages < u32::MAX {
                self.chunk[at + 9..at + 13].copy_from_slice(&(pages + 1).to_le_bytes());
                self.zero_run = Some((at, GuestFrame(next.0 + 1), end, pages + 1));
                return Ok(());
            }
        }
        let mut rec = [0u8; format::ZERO_LEN];
        rec[0] = kind::ZERO;
        rec[1..9].copy_from_slice(&pfn.addr().0.to_le_bytes());
        rec[9..].copy_from_slice(&1u32.to_le_bytes());
        self.push(&[&rec])?;
        let next = GuestFrame(pfn.0 + 1);
        let end = self.layout.region_end(pfn).unwrap_or(next);
        self.zero_run = Some((self.chunk.len() - format::ZERO_LEN, next, end, 1));
        Ok(())
    }

    /// Appends one record made of `parts`, first ending the chunk if the
    /// record would not fit.
    fn push(&mut self, parts: &[&[u8]]) -> Result<(), StreamError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if self.chunk.len() > 4 && self.chunk.len() - 4 + len > self.opts.chunk_bytes as usize {
            self.end_chunk()?;
        }
        for p in parts {
            self.chunk.extend_from_slice(p);
        }
        self.zero_run = None;
        self.ref_run = None;
        Ok(())
    }

    /// Writes the chunk being built, if it has any record.
    fn end_chunk(&mut self) -> Result<(), StreamError> {
        self.zero_run = None;
        self.ref_run = None;
        if self.chunk.len() <= 4 {
            return Ok(());
        }
        #[allow(clippy::cast_possible_truncation)] // <= MAX_CHUNK
        let len = (self.chunk.len() - 4) as u32;
        self.chunk[..4].copy_from_slice(&len.to_le_bytes());
        let sum = format::chunk_checksum(&self.chunk, self.seed, self.chunk_no);
        self.chunk.extend_from_slice(&sum.to_le_bytes());
        let chunk = std::mem::take(&mut self.chunk);
        let r = self.write_out(&chunk);
        self.chunk = chunk;
        self.chunk.clear();
        self.chunk.extend_from_slice(&[0; 4]);
        r?;
        self.chunk_no += 1;
        self.stats.chunks += 1;
        Ok(())
    }

    fn write_out(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        let r = self.out.write_all(bytes);
        self.io(r)?;
        self.stats.bytes += bytes.len() as u64;
        Ok(())
    }

    fn io(&mut self, r: std::io::Result<()>) -> Result<(), StreamError> {
        r.map_err(|source| {
            self.failed = true;
            StreamError::Io {
                at: self.stats.bytes,
                source,
            }
        })
    }

    fn check(&self) -> Result<(), StreamError> {
        if self.failed {
            Err(StreamError::WriterFailed)
        } else {
            Ok(())
        }
    }

    fn position(&self) -> Position {
        Position {
            offset: self.stats.bytes,
            chunk: self.chunk_no,
            record: 0,
        }
    }
}
