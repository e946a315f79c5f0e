//! One partition of a file (or block device), seen as a whole device.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

/// `len` bytes of `file` from `offset`, as a device of its own: reads stop at its end,
/// writes past its end fail with [`io::ErrorKind::WriteZero`], and nothing outside it
/// is ever read or written.
#[derive(Debug)]
pub struct Window<'f> {
    file: &'f File,
    offset: u64,
    len: u64,
    pos: u64,
}

impl<'f> Window<'f> {
    pub fn new(file: &'f File, offset: u64, len: u64) -> Self {
        Self {
            file,
            offset,
            len,
            pos: 0,
        }
    }

    /// The window's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Read for Window<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.offset + self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Write for Window<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let left = self.len.saturating_sub(self.pos);
        if left == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the partition",
            ));
        }
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let put = self.file.write_at(&buf[..n], self.offset + self.pos)?;
        self.pos += put as u64;
        Ok(put)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Window<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        }
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the partition",
            )
        })?;
        self.pos = pos;
        Ok(pos)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn windows_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![0u8; 100]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let mut w = Window::new(&f, 10, 20);
        assert_eq!(w.seek(SeekFrom::End(-5)).unwrap(), 15);
        assert_eq!(w.write(&[1; 10]).unwrap(), 5);
        assert_eq!(w.write(&[1]).unwrap_err().kind(), io::ErrorKind::WriteZero);
        assert!(w.seek(SeekFrom::Current(-100)).is_err());
        w.seek(SeekFrom::Start(0)).unwrap();
        let mut all = Vec::new();
        w.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 20);
        let disk = std::fs::read(&p).unwrap();
        assert_eq!(&disk[25..30], &[1; 5]);
        assert!(disk[..25].iter().chain(&disk[30..]).all(|b| *b == 0));
    }
}
