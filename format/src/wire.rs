//! The primitive encoding every Starlight record uses: LEB128 varints and length-prefixed byte
//! strings. The reader never trusts a length: each one is checked against the bytes that remain
//! and against a per-field cap before anything is allocated.

use crate::{Digest, FormatError};

/// Appends encoded values to a buffer.
#[derive(Debug, Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer::default()
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn raw(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    pub fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }
    /// Signed values use zigzag so that small negative numbers stay short.
    pub fn zigzag(&mut self, v: i64) {
        self.varint(((v << 1) ^ (v >> 63)) as u64);
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.varint(v.len() as u64);
        self.raw(v);
    }
    pub fn digest(&mut self, d: &Digest) {
        self.raw(&d.0);
    }
}

/// Reads encoded values from a slice; every method fails cleanly on truncated or hostile input.
#[derive(Debug)]
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { data, pos: 0 }
    }
    pub fn position(&self) -> usize {
        self.pos
    }
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
    fn err(&self, what: &'static str) -> FormatError {
        FormatError::Malformed { what, offset: self.pos }
    }
    pub fn raw(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FormatError> {
        if self.remaining() < n {
            return Err(self.err(what));
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
    pub fn u8(&mut self, what: &'static str) -> Result<u8, FormatError> {
        Ok(self.raw(1, what)?[0])
    }
    pub fn varint(&mut self, what: &'static str) -> Result<u64, FormatError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8(what)?;
            if i == 9 && b > 1 {
                return Err(self.err(what));
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                // Reject non-minimal encodings so that every value has exactly one encoding,
                // which keeps digests of records stable.
                if i > 0 && b == 0 {
                    return Err(self.err(what));
                }
                return Ok(v);
            }
        }
        Err(self.err(what))
    }
    /// A varint that must not exceed `max`.
    pub fn varint_max(&mut self, max: u64, what: &'static str) -> Result<u64, FormatError> {
        let start = self.pos;
        let v = self.varint(what)?;
        if v > max {
            return Err(FormatError::Malformed { what, offset: start });
        }
        Ok(v)
    }
    pub fn zigzag(&mut self, what: &'static str) -> Result<i64, FormatError> {
        let v = self.varint(what)?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }
    pub fn bytes(&mut self, max: usize, what: &'static str) -> Result<&'a [u8], FormatError> {
        let n = self.varint_max(max as u64, what)? as usize;
        self.raw(n, what)
    }
    pub fn string(&mut self, max: usize, what: &'static str) -> Result<String, FormatError> {
        let start = self.pos;
        let b = self.bytes(max, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| FormatError::Malformed { what, offset: start })
    }
    pub fn digest(&mut self, what: &'static str) -> Result<Digest, FormatError> {
        let mut d = [0u8; 32];
        d.copy_from_slice(self.raw(32, what)?);
        Ok(Digest(d))
    }
    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<(), FormatError> {
        if self.remaining() != 0 {
            return Err(self.err("trailing bytes"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varints_round_trip(v: u64, s: i64) {
            let mut w = Writer::new();
            w.varint(v);
            w.zigzag(s);
            let mut r = Reader::new(&w.buf);
            prop_assert_eq!(r.varint("v").unwrap(), v);
            prop_assert_eq!(r.zigzag("s").unwrap(), s);
            prop_assert!(r.finish().is_ok());
        }
    }

    #[test]
    fn rejects_overlong_and_non_minimal() {
        assert!(Reader::new(&[0xff; 11]).varint("x").is_err());
        assert!(Reader::new(&[0x80, 0x00]).varint("x").is_err());
        assert!(Reader::new(&[0x80]).varint("x").is_err());
        // A length larger than the data is an error, not an allocation.
        let mut w = Writer::new();
        w.varint(1 << 40);
        assert!(Reader::new(&w.buf).bytes(usize::MAX, "b").is_err());
    }
}
