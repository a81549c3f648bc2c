//! An in-memory pipe for a migration stream between two threads of one
//! process: the writer sends each write as one message over a bounded
//! channel, the reader hands them out in order and sees the end of the
//! stream once the writer is dropped.

use std::{
    io::{self, Read, Write},
    sync::mpsc,
};

/// A pipe holding up to `messages` writes in flight: the writer blocks
/// while it is full.
pub fn pipe(messages: usize) -> (PipeWriter, PipeReader) {
    let (tx, rx) = mpsc::sync_channel(messages);
    (
        PipeWriter(tx),
        PipeReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        },
    )
}

/// The writing end of an in-memory pipe: each write is one message;
/// writing fails with [`io::ErrorKind::BrokenPipe`] once the reader is
/// gone.
pub struct PipeWriter(mpsc::SyncSender<Vec<u8>>);

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .send(buf.to_vec())
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The reading end: reads return 0 (the end of the stream) once the writer
/// is dropped and everything it wrote has been read.
pub struct PipeReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(b) => (self.buf, self.pos) = (b, 0),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
