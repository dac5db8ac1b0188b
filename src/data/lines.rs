//! A line reader with a length cap, under the MUGE reader: an over-long line
//! is reported (and skipped past) without ever being held in memory whole.

use std::io::{self, BufRead};

/// One physical line, its terminating `\n` removed (a `\r` before it kept, so
/// the caller can report CRLF).
#[derive(Clone, Copy)]
pub(crate) enum RawLine<'a> {
    Line(&'a [u8]),
    /// Longer than the cap; `len` is its full length in bytes, `head` its
    /// first `max` bytes (enough to name the record).
    TooLong {
        len: usize,
        head: &'a [u8],
    },
}

pub(crate) struct LineReader<R> {
    inner: R,
    max: usize,
    line_no: usize,
    buf: Vec<u8>,
}

impl<R: BufRead> LineReader<R> {
    pub(crate) fn new(inner: R, max: usize) -> Self {
        Self {
            inner,
            max,
            line_no: 0,
            buf: Vec::new(),
        }
    }

    /// The next line and its 1-based number, or `None` at end of input.
    pub(crate) fn next_line(&mut self) -> io::Result<Option<(usize, RawLine<'_>)>> {
        self.buf.clear();
        let mut len = 0usize;
        let mut any = false;
        loop {
            let avail = match self.inner.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if avail.is_empty() {
                break;
            }
            any = true;
            let (take, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(p) => (p, true),
                None => (avail.len(), false),
            };
            let room = self.max.saturating_sub(len).min(take);
            self.buf.extend_from_slice(&avail[..room]);
            len += take;
            let consumed = if done { take + 1 } else { take };
            self.inner.consume(consumed);
            if done {
                break;
            }
        }
        if !any {
            return Ok(None);
        }
        self.line_no += 1;
        let line = if len > self.max {
            RawLine::TooLong {
                len,
                head: &self.buf,
            }
        } else {
            RawLine::Line(&self.buf)
        };
        Ok(Some((self.line_no, line)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(input: &[u8], max: usize) -> Vec<(usize, Result<Vec<u8>, usize>)> {
        let mut r = LineReader::new(input, max);
        let mut out = Vec::new();
        while let Some((n, l)) = r.next_line().unwrap() {
            out.push((
                n,
                match l {
                    RawLine::Line(b) => Ok(b.to_vec()),
                    RawLine::TooLong { len, .. } => Err(len),
                },
            ));
        }
        out
    }

    #[test]
    fn splits_caps_and_keeps_cr() {
        let got = collect(b"ab\r\n\nxxxxxx\nlast", 4);
        assert_eq!(
            got,
            vec![
                (1, Ok(b"ab\r".to_vec())),
                (2, Ok(vec![])),
                (3, Err(6)),
                (4, Ok(b"last".to_vec())),
            ]
        );
        assert!(collect(b"", 4).is_empty());
        assert_eq!(collect(b"a\n", 4).len(), 1);
    }
}
