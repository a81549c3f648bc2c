//! Snapshot files: reads at an offset that name the part they read, and a
//! new file written beside its final name and renamed into place only once
//! it is complete and on disk, so a crash mid-save never leaves a file at
//! that name (an old snapshot there stays whole until the rename).

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufWriter, Write},
    os::unix::{
        fs::{FileExt, OpenOptionsExt},
        io::AsRawFd,
    },
    path::{Path, PathBuf},
};

use super::error::{Part, Place, SnapshotError};

/// Reads `buf.len()` bytes at `offset` of `file` (`len` bytes long when
/// opened), part `part`: a file shorter than that (cut since it was
/// opened) is `Truncated`.
pub(crate) fn read_at(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    part: Part,
) -> Result<(), SnapshotError> {
    file.read_exact_at(buf, offset).map_err(|source| {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            SnapshotError::Truncated {
                at: Place::new(part, offset),
                file_len: file.metadata().map_or(0, |m| m.len()),
            }
        } else {
            SnapshotError::Io {
                at: Place::new(part, offset),
                source,
            }
        }
    })
}

/// Opens `path` for reading, refusing anything but a regular file: a FIFO
/// would block the open (it is opened non-blocking, so it does not) and a
/// device or a FIFO would read without end. With `no_follow`, a symbolic
/// link as the last component is an error (`ELOOP`) rather than followed.
/// `Err(None)` for a file that is not regular, `Err(Some(_))` for an error
/// of the open.
pub(crate) fn open_regular(path: &Path, no_follow: bool) -> Result<File, Option<io::Error>> {
    let flags = if no_follow {
        libc::O_NONBLOCK | libc::O_NOFOLLOW
    } else {
        libc::O_NONBLOCK
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(Some)?;
    if !file.metadata().map_err(Some)?.is_file() {
        return Err(None);
    }
    // A regular file: blocking reads again, as every reader expects (Linux
    // ignores the flag on regular files, a FUSE daemon may not).
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor `file` owns and keeps open; it touches
    // no memory of this process.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(Some(io::Error::last_os_error()));
    }
    // SAFETY: as above; the flags are the descriptor's own, less one.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(Some(io::Error::last_os_error()));
    }
    Ok(file)
}

/// A file being written under a temporary name next to `dest`.
pub(crate) struct NewFile {
    tmp: PathBuf,
    dest: PathBuf,
    out: Option<BufWriter<File>>,
    /// Bytes written so far.
    pos: u64,
}

impl NewFile {
    /// Creates the temporary file (a name no other writer takes: process
    /// id and a counter), readable and writable by its owner only: it
    /// holds a guest's memory (the caller widens it after the save if it
    /// must).
    pub(crate) fn create(dest: &Path) -> Result<Self, SnapshotError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // At most 200 bytes of the destination's name, so the temporary
        // name stays within NAME_MAX (255 bytes) however long the
        // destination's is.
        let mut name = String::new();
        for c in dest
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .chars()
        {
            if name.len() + c.len_utf8() > 200 {
                break;
            }
            name.push(c);
        }
        let tmp = dest.with_file_name(format!(
            ".{name}.tmp.{}.{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|source| SnapshotError::File {
                op: "create",
                path: tmp.clone(),
                source,
            })?;
        Ok(NewFile {
            tmp,
            dest: dest.to_path_buf(),
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            pos: 0,
        })
    }

    /// Bytes written so far.
    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    /// Appends `bytes`, which belong to part `part`.
    pub(crate) fn write(&mut self, bytes: &[u8], part: Part) -> Result<(), SnapshotError> {
        let at = Place::new(part, self.pos);
        let out = self.out.as_mut().ok_or(SnapshotError::Io {
            at,
            source: io::Error::other("file already finished"),
        })?;
        out.write_all(bytes)
            .map_err(|source| SnapshotError::Io { at, source })?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Writes `header` over the file's first bytes, syncs the file, renames
    /// it to its final name and syncs the directory.
    pub(crate) fn finish(mut self, header: &[u8]) -> Result<(), SnapshotError> {
        let at = Place::new(Part::Header, 0);
        let out = self.out.take().ok_or(SnapshotError::Io {
            at,
            source: io::Error::other("file already finished"),
        })?;
        let file = out.into_inner().map_err(|e| SnapshotError::Io {
            at: Place::new(Part::Table, self.pos),
            source: e.into_error(),
        })?;
        file.write_all_at(header, 0)
            .map_err(|source| SnapshotError::Io { at, source })?;
        let fail = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| SnapshotError::File { op, path, source }
        };
        file.sync_all().map_err(fail("sync", &self.tmp))?;
        drop(file);
        fs::rename(&self.tmp, &self.dest).map_err(fail("rename into place", &self.dest))?;
        self.tmp = PathBuf::new();
        let dir = match self.dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(fail("sync the directory of", &self.dest))
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            // A save that failed: its partial file goes.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}
