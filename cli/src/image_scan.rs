//! The streaming count behind `pagefold estimate`: what folding a set of raw
//! RAM images would save, found by reading each image once, in order, in
//! fixed-size chunks. Memory is one chunk buffer plus a hash index of the
//! distinct page contents (about 20–40 bytes each: an 8-byte hash key, an
//! 8-byte first location and the table's slack); it never holds an image.
//! Every figure is exact: a zero page is one whose bytes are all zero, and a
//! page counted as a duplicate was compared byte for byte with the first
//! copy of its content (read again from its file). Needs no privilege:
//! nothing is mapped, written or write-protected.

use std::{collections::HashMap, fs::File};

use nohash_hasher::IntMap;
use pagefold::PAGE_SIZE;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_secret};

use crate::images::{Image, ImageError};

/// Bytes read per `read` call: large enough that the syscalls cost nothing
/// beside hashing, small enough to stay in the L2/L3 caches.
const CHUNK_BYTES: usize = 1 << 20;

/// The flag bit of an index value: the content has been seen at least twice.
/// The other bits are the global page number of its first copy.
const SHARED: u64 = 1 << 63;

/// Figures for one image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ImageCounts {
    pub(crate) pages: u64,
    pub(crate) zero_pages: u64,
    /// Non-zero pages whose content occurs elsewhere too (in this image or
    /// another): pages a fold would map to a shared frame.
    pub(crate) merged_pages: u64,
}

/// Figures for the whole input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) images: Vec<ImageCounts>,
    /// Distinct non-zero contents: the frames a fold still needs.
    pub(crate) distinct_pages: u64,
    /// Contents seen at least twice (KSM's `pages_shared`).
    pub(crate) pages_shared: u64,
    /// Non-zero pages beyond each content's first (KSM's `pages_sharing`):
    /// the non-zero pages a fold saves.
    pub(crate) pages_sharing: u64,
    /// Pages whose hash matched a different content's (told apart by their
    /// bytes, so no figure is off; counted to show the check is real).
    pub(crate) hash_collisions: u64,
}

impl Counts {
    /// All pages.
    pub(crate) fn total_pages(&self) -> u64 {
        self.images.iter().map(|i| i.pages).sum()
    }

    /// All zero pages.
    pub(crate) fn zero_pages(&self) -> u64 {
        self.images.iter().map(|i| i.zero_pages).sum()
    }

    /// Pages a fold saves: every zero page and every non-zero duplicate.
    pub(crate) fn saved_pages(&self) -> u64 {
        self.zero_pages() + self.pages_sharing
    }
}

/// Counts `images` (checked by [`Image::check_all`]), calling `progress`
/// with the bytes of each chunk read. Hashes with xxh3 under a secret from
/// the OS random source, so an image's contents cannot be made to collide.
pub(crate) fn count(images: &[Image], progress: impl FnMut(u64)) -> Result<Counts, ImageError> {
    let mut secret = [0u8; 192];
    // Without the random source the figures are as exact, only the hash is
    // guessable: a crafted collision costs a byte comparison, not a figure.
    let secret = getrandom::fill(&mut secret).ok().map(|()| secret);
    let hash = move |page: &[u8]| match &secret {
        Some(s) => xxh3_64_with_secret(page, s),
        None => xxh3_64(page),
    };
    count_with(images, CHUNK_BYTES, hash, progress)
}

/// [`count`] with the chunk size (a whole number of pages, at least one)
/// and the page hash chosen by the caller.
pub(crate) fn count_with(
    images: &[Image],
    chunk_bytes: usize,
    hash: impl Fn(&[u8]) -> u64,
    mut progress: impl FnMut(u64),
) -> Result<Counts, ImageError> {
    let chunk_bytes = (chunk_bytes / PAGE_SIZE).max(1) * PAGE_SIZE;
    let mut index = Index::new(images, hash);
    let mut buf = vec![0u8; chunk_bytes];
    for (i, image) in images.iter().enumerate() {
        // A handle of its own, read only in order, so the kernel's
        // readahead sees one sequential reader (the byte checks read
        // other places through the shared handles).
        let file = index.files.open(i)?;
        let mut offset = 0;
        while offset < image.bytes() {
            let n = chunk_bytes.min(usize::try_from(image.bytes() - offset).unwrap_or(chunk_bytes));
            image.read_at(&file, &mut buf[..n], offset)?;
            for (k, page) in buf[..n].chunks_exact(PAGE_SIZE).enumerate() {
                index.add(i, offset / PAGE_SIZE as u64 + k as u64, page)?;
            }
            offset += n as u64;
            progress(n as u64);
        }
    }
    Ok(index.counts)
}

/// Whether every byte of `page` is zero. Compared 64 bytes at a time, which
/// the compiler turns into vector ORs; a non-zero page is usually told in
/// its first block.
fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// The distinct contents seen so far, and the figures.
struct Index<'a, H> {
    images: &'a [Image],
    /// Global page number of each image's first page (for locating a first
    /// copy from the 63 bits an index value has for it).
    starts: Vec<u64>,
    hash: H,
    /// Hash of a content -> its first copy (global page number) | `SHARED`.
    contents: IntMap<u64, u64>,
    /// Further contents with a hash already in `contents` (a collision):
    /// as rare as 64-bit collisions, so a plain list each.
    colliding: HashMap<u64, Vec<u64>>,
    files: OpenFiles<'a>,
    scratch: Vec<u8>,
    counts: Counts,
}

impl<'a, H: Fn(&[u8]) -> u64> Index<'a, H> {
    fn new(images: &'a [Image], hash: H) -> Self {
        let starts = images
            .iter()
            .scan(0, |next, i| {
                let start = *next;
                *next += i.pages;
                Some(start)
            })
            .collect();
        Index {
            images,
            starts,
            hash,
            contents: IntMap::default(),
            colliding: HashMap::new(),
            files: OpenFiles::new(images),
            scratch: vec![0u8; PAGE_SIZE],
            counts: Counts {
                images: images
                    .iter()
                    .map(|i| ImageCounts {
                        pages: i.pages,
                        ..ImageCounts::default()
                    })
                    .collect(),
                ..Counts::default()
            },
        }
    }

    /// Counts page `page` of image `image`, holding `bytes`.
    fn add(&mut self, image: usize, page: u64, bytes: &[u8]) -> Result<(), ImageError> {
        if is_zero(bytes) {
            self.counts.images[image].zero_pages += 1;
            return Ok(());
        }
        let h = (self.hash)(bytes);
        let here = self.starts[image] + page;
        let Some(&first) = self.contents.get(&h) else {
            self.contents.insert(h, here);
            self.counts.distinct_pages += 1;
            return Ok(());
        };
        if self.same_as(first, h, bytes)? {
            let first = self.duplicate(first, image);
            self.contents.insert(h, first);
            return Ok(());
        }
        // A different content with the same hash: one of the others with
        // this hash, or new.
        let others = self.colliding.remove(&h).unwrap_or_default();
        let mut others = others.into_iter();
        let mut kept = Vec::new();
        let mut found = false;
        for other in others.by_ref() {
            if self.same_as(other, h, bytes)? {
                kept.push(self.duplicate(other, image));
                found = true;
                break;
            }
            kept.push(other);
        }
        kept.extend(others);
        if !found {
            kept.push(here);
            self.counts.distinct_pages += 1;
            self.counts.hash_collisions += 1;
        }
        self.colliding.insert(h, kept);
        Ok(())
    }

    /// Counts a page of `image` whose content's first copy is `first` (an
    /// index value); returns the value to store back.
    fn duplicate(&mut self, first: u64, image: usize) -> u64 {
        if first & SHARED == 0 {
            // The first copy becomes merged too, now that it has a partner.
            let (owner, _) = self.locate(first);
            self.counts.images[owner].merged_pages += 1;
            self.counts.pages_shared += 1;
        }
        self.counts.images[image].merged_pages += 1;
        self.counts.pages_sharing += 1;
        first | SHARED
    }

    /// Whether `bytes` equal the first copy that index value `first`
    /// stands for, read again from its file.
    fn same_as(&mut self, first: u64, h: u64, bytes: &[u8]) -> Result<bool, ImageError> {
        let (owner, page) = self.locate(first);
        let image = &self.images[owner];
        let file = self.files.get(owner)?;
        image.read_at(file, &mut self.scratch, page * PAGE_SIZE as u64)?;
        if self.scratch == bytes {
            return Ok(true);
        }
        if (self.hash)(&self.scratch) != h {
            // It hashed to `h` when it was read in order: it was rewritten
            // since, and no figure about it could be trusted.
            return Err(ImageError::Changed {
                path: image.path.clone(),
                page,
            });
        }
        Ok(false)
    }

    /// (image, page in it) of an index value.
    fn locate(&self, value: u64) -> (usize, u64) {
        let global = value & !SHARED;
        let image = self.starts.partition_point(|&s| s <= global) - 1;
        (image, global - self.starts[image])
    }
}

/// The images' open files, opened when first needed and kept for byte
/// checks. Where the process runs out of descriptors (a fleet's worth of
/// images), every file but the one asked for is closed and opened again
/// later.
struct OpenFiles<'a> {
    images: &'a [Image],
    files: Vec<Option<File>>,
}

impl<'a> OpenFiles<'a> {
    fn new(images: &'a [Image]) -> Self {
        OpenFiles {
            images,
            files: images.iter().map(|_| None).collect(),
        }
    }

    fn get(&mut self, i: usize) -> Result<&File, ImageError> {
        let file = match self.files[i].take() {
            Some(f) => f,
            None => self.open(i)?,
        };
        Ok(self.files[i].insert(file))
    }

    /// Opens image `i` afresh (closing the kept ones if descriptors ran out).
    fn open(&mut self, i: usize) -> Result<File, ImageError> {
        match self.images[i].open() {
            Err(ImageError::Open { source, .. })
                if matches!(source.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) =>
            {
                self.files.iter_mut().for_each(|f| *f = None);
                self.images[i].open()
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{count, count_with, Counts, ImageCounts};
    use crate::images::{Image, ImageError};

    const PAGE: usize = 4096;

    /// Writes an image whose page `i` is `f(i)` repeated, and checks it.
    fn image(dir: &Path, name: &str, pages: usize, f: impl Fn(usize) -> u8) -> Image {
        let data: Vec<u8> = (0..pages).flat_map(|i| [f(i); PAGE]).collect();
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        Image::check(&p).unwrap()
    }

    /// A: 0 0 1 1 1 2 3 4 5 0; B: 1 6 6 7 2 0 (by page content byte).
    fn two_images(dir: &Path) -> Vec<Image> {
        let a = [0, 0, 1, 1, 1, 2, 3, 4, 5, 0];
        let b = [1, 6, 6, 7, 2, 0];
        vec![
            image(dir, "a.img", a.len(), |i| a[i]),
            image(dir, "b.img", b.len(), |i| b[i]),
        ]
    }

    /// What the two images hold, by construction: non-zero contents 1..=7
    /// (7 distinct), of which 1 (x4), 2 (x2) and 6 (x2) repeat.
    fn expected() -> Counts {
        Counts {
            images: vec![
                ImageCounts {
                    pages: 10,
                    zero_pages: 3,
                    merged_pages: 4, // three 1s and a 2
                },
                ImageCounts {
                    pages: 6,
                    zero_pages: 1,
                    merged_pages: 4, // a 1, two 6s and a 2
                },
            ],
            distinct_pages: 7,
            pages_shared: 3,
            pages_sharing: 3 + 1 + 1,
            hash_collisions: 0,
        }
    }

    #[test]
    fn counts_zero_and_shared_pages_across_images_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let images = two_images(dir.path());
        let mut read = 0;
        let c = count(&images, |n| read += n).unwrap();
        assert_eq!(c, expected());
        assert_eq!(read, 16 * PAGE as u64, "progress covers every byte once");
        assert_eq!(c.saved_pages(), 16 - 7);
    }

    #[test]
    fn chunk_boundaries_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let images = two_images(dir.path());
        for pages in [1, 3, 4, 7, 64] {
            let mut calls = 0;
            let c = count_with(&images, pages * PAGE, xxhash_rust::xxh3::xxh3_64, |n| {
                // The buffer is bounded: no read is larger than one chunk.
                assert!(n <= (pages * PAGE) as u64);
                calls += 1;
            })
            .unwrap();
            assert_eq!(c, expected(), "chunk of {pages} pages");
            assert_eq!(calls, 10usize.div_ceil(pages) + 6usize.div_ceil(pages));
        }
    }

    /// Every page hashes alike: the byte checks alone must still give the
    /// exact figures, and say how many collisions they caught.
    #[test]
    fn hash_collisions_are_told_apart_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let images = two_images(dir.path());
        let c = count_with(&images, 2 * PAGE, |_| 42, |_| {}).unwrap();
        let mut want = expected();
        // Each distinct content after the first collides with the first.
        want.hash_collisions = 6;
        assert_eq!(c, want);
    }

    #[test]
    fn a_first_copy_rewritten_during_the_count_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let images = two_images(dir.path());
        let a = images[0].path.clone();
        // Rewrites a.img's page 2 (content 1) once a.img has been read, so
        // b.img's page 0 (content 1) finds its first copy changed.
        let mut done = false;
        let e = count_with(&images, 10 * PAGE, xxhash_rust::xxh3::xxh3_64, |_| {
            if !done {
                let mut data = std::fs::read(&a).unwrap();
                data[2 * PAGE..3 * PAGE].fill(9);
                std::fs::write(&a, data).unwrap();
                done = true;
            }
        })
        .unwrap_err();
        assert!(matches!(e, ImageError::Changed { page: 2, .. }), "{e:?}");
        assert!(e.to_string().contains("a.img"), "{e}");
    }
}
