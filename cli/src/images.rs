//! Raw guest RAM image files as the command line opens and reads them:
//! checked up front (exists, a regular file or block device, at least one
//! page), with every failure naming its file, and a trailing partial page
//! reported instead of silently dropped. Never holds an image's bytes.

use std::{
    fs::File,
    io::{self, Seek, SeekFrom},
    os::unix::fs::{FileExt, FileTypeExt},
    path::{Path, PathBuf},
};

use pagefold::PAGE_SIZE;

/// What went wrong with one image file; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ImageError {
    /// The file could not be opened (missing, no permission, ...).
    #[error("{}: cannot open: {source}", .path.display())]
    Open { path: PathBuf, source: io::Error },
    /// A directory was given where an image was expected.
    #[error("{}: is a directory, not a RAM image", .path.display())]
    Directory { path: PathBuf },
    /// Neither a regular file nor a block device (a FIFO, a socket, a
    /// character device): its size is unknown and it cannot be re-read.
    #[error("{}: not a regular file or block device", .path.display())]
    NotAFile { path: PathBuf },
    /// Its size could not be found.
    #[error("{}: cannot find its size: {source}", .path.display())]
    Size { path: PathBuf, source: io::Error },
    /// Empty.
    #[error("{}: empty (0 bytes)", .path.display())]
    Empty { path: PathBuf },
    /// Shorter than one page.
    #[error("{}: {len} bytes, smaller than one page ({PAGE_SIZE} bytes)", .path.display())]
    TooSmall { path: PathBuf, len: u64 },
    /// More pages than this host can count.
    #[error("{}: too large for this host", .path.display())]
    TooLarge { path: PathBuf },
    /// A read failed.
    #[error("{}: read at byte {offset} failed: {source}", .path.display())]
    Read {
        path: PathBuf,
        offset: u64,
        source: io::Error,
    },
    /// The file ended before the length it had when it was checked.
    #[error("{}: ends before byte {end}, the length it had when opened (changed while being read?)", .path.display())]
    Shrunk { path: PathBuf, end: u64 },
    /// A page read again no longer holds the bytes it held when it was
    /// first read.
    #[error("{}: page {page} changed while being read (its bytes no longer match the first read)", .path.display())]
    Changed { path: PathBuf, page: u64 },
}

/// One image, checked: whole pages and the bytes past the last one.
#[derive(Clone, Debug)]
pub(crate) struct Image {
    pub(crate) path: PathBuf,
    /// Whole 4 KiB pages.
    pub(crate) pages: u64,
    /// Bytes past the last whole page (not counted anywhere).
    pub(crate) trailing_bytes: u64,
}

impl Image {
    /// Checks `path`: refuses what is not a regular file or block device
    /// before opening it, opens it and finds its length on the open handle
    /// (a block device's by seeking to its end). The file is closed again, so a fleet's worth of
    /// images does not hold a descriptor each.
    pub(crate) fn check(path: &Path) -> Result<Self, ImageError> {
        let path_buf = || path.to_path_buf();
        let mut file = open(path)?;
        let meta = file.metadata().map_err(|source| ImageError::Size {
            path: path_buf(),
            source,
        })?;
        let ty = meta.file_type();
        let len = if ty.is_dir() {
            return Err(ImageError::Directory { path: path_buf() });
        } else if ty.is_file() {
            meta.len()
        } else if ty.is_block_device() {
            file.seek(SeekFrom::End(0))
                .map_err(|source| ImageError::Size {
                    path: path_buf(),
                    source,
                })?
        } else {
            return Err(ImageError::NotAFile { path: path_buf() });
        };
        let page = PAGE_SIZE as u64;
        match len {
            0 => Err(ImageError::Empty { path: path_buf() }),
            len if len < page => Err(ImageError::TooSmall {
                path: path_buf(),
                len,
            }),
            len => Ok(Image {
                path: path_buf(),
                pages: len / page,
                trailing_bytes: len % page,
            }),
        }
    }

    /// Checks every image before any work is done, and warns on stderr of
    /// each trailing partial page (those bytes are not counted).
    pub(crate) fn check_all(paths: &[PathBuf]) -> Result<Vec<Self>, ImageError> {
        let images = paths
            .iter()
            .map(|p| Self::check(p))
            .collect::<Result<Vec<_>, _>>()?;
        for i in &images {
            if i.trailing_bytes > 0 {
                eprintln!(
                    "pagefold: warning: {}: {} trailing bytes past the last whole 4 KiB page were not counted",
                    i.path.display(),
                    i.trailing_bytes
                );
            }
        }
        Ok(images)
    }

    /// Opens the image for reading.
    pub(crate) fn open(&self) -> Result<File, ImageError> {
        open(&self.path)
    }

    /// Bytes of whole pages.
    pub(crate) fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE as u64
    }

    /// Fills `buf` from byte `offset` of `file` (this image, open), naming
    /// the image in any error; running into its end is [`ImageError::Shrunk`].
    pub(crate) fn read_at(
        &self,
        file: &File,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(), ImageError> {
        file.read_exact_at(buf, offset).map_err(|source| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                ImageError::Shrunk {
                    path: self.path.clone(),
                    end: offset + buf.len() as u64,
                }
            } else {
                ImageError::Read {
                    path: self.path.clone(),
                    offset,
                    source,
                }
            }
        })
    }
}

/// Opens `path` for reading, once its type says an open is harmless: a
/// FIFO with no writer would block the open forever, and opening some
/// character devices has side effects, so anything that is not a regular
/// file or a block device is refused before it is opened (by the path's
/// metadata, following links; [`Image::check`] checks the opened handle's
/// type again).
fn open(path: &Path) -> Result<File, ImageError> {
    let path_buf = || path.to_path_buf();
    let meta = std::fs::metadata(path).map_err(|source| ImageError::Open {
        path: path_buf(),
        source,
    })?;
    let ty = meta.file_type();
    if ty.is_dir() {
        return Err(ImageError::Directory { path: path_buf() });
    }
    if !ty.is_file() && !ty.is_block_device() {
        return Err(ImageError::NotAFile { path: path_buf() });
    }
    File::open(path).map_err(|source| ImageError::Open {
        path: path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::{Image, ImageError};

    #[test]
    fn sizes_and_refusals_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("odd.img");
        std::fs::write(&p, vec![7u8; 2 * 4096 + 5]).unwrap();
        let i = Image::check(&p).unwrap();
        assert_eq!((i.pages, i.trailing_bytes), (2, 5));

        let missing = dir.path().join("missing.img");
        let e = Image::check(&missing).unwrap_err();
        assert!(matches!(e, ImageError::Open { .. }), "{e:?}");
        assert!(e.to_string().contains("missing.img"), "{e}");

        let e = Image::check(dir.path()).unwrap_err();
        assert!(matches!(e, ImageError::Directory { .. }), "{e:?}");

        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        let e = Image::check(&empty).unwrap_err();
        assert!(matches!(e, ImageError::Empty { .. }), "{e:?}");
        assert!(e.to_string().contains("empty.img"), "{e}");

        // Shrinking under the reader is named too.
        let f = i.open().unwrap();
        std::fs::write(&p, vec![7u8; 4096]).unwrap();
        let mut buf = vec![0u8; 4096];
        let e = i.read_at(&f, &mut buf, 4096).unwrap_err();
        assert!(matches!(e, ImageError::Shrunk { end: 8192, .. }), "{e:?}");
        assert!(e.to_string().contains("odd.img"), "{e}");
    }
}
