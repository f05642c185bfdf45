//! The little-endian field encoding every record payload and snapshot item uses:
//! integers as they are, strings and byte strings with a u32 length in front, an
//! optional string as a 0/1 tag and the string. One reader for every decoder, so
//! that a length past the end is refused the same way everywhere.

/// Appends a byte string with its u32 length.
pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Appends an optional string: tag 0, or tag 1 and the string.
pub fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_bytes(out, s.as_bytes());
        }
    }
}

/// Reads fields in order from a payload; every read checks the bounds.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Names the payload in errors ("message record truncated").
    truncated: &'static str,
}

impl<'a> Reader<'a> {
    /// `truncated` is the error for a field that runs past the end.
    pub fn new(buf: &'a [u8], truncated: &'static str) -> Reader<'a> {
        Reader {
            buf,
            pos: 0,
            truncated,
        }
    }

    /// Bytes read so far.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Whether every byte was read (a decoder refuses trailing bytes).
    pub fn at_end(&self) -> bool {
        self.pos == self.buf.len()
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let end = self.pos.checked_add(n).ok_or("length overflow")?;
        let s = self.buf.get(self.pos..end).ok_or(self.truncated)?;
        self.pos = end;
        Ok(s)
    }

    pub fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    pub fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    pub fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    pub fn bytes(&mut self) -> Result<&'a [u8], &'static str> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    pub fn str(&mut self) -> Result<&'a str, &'static str> {
        std::str::from_utf8(self.bytes()?).map_err(|_| "string is not UTF-8")
    }

    pub fn string(&mut self) -> Result<String, &'static str> {
        self.str().map(String::from)
    }

    pub fn opt_str(&mut self) -> Result<Option<&'a str>, &'static str> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.str()?)),
            _ => Err("bad option tag"),
        }
    }

    pub fn opt(&mut self) -> Result<Option<String>, &'static str> {
        Ok(self.opt_str()?.map(String::from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_short_input_is_refused() {
        let mut out = Vec::new();
        put_bytes(&mut out, b"abc");
        put_opt(&mut out, None);
        put_opt(&mut out, Some("d"));
        out.extend_from_slice(&7u64.to_le_bytes());
        let mut r = Reader::new(&out, "cut");
        assert_eq!(r.bytes().unwrap(), b"abc");
        assert_eq!(r.opt().unwrap(), None);
        assert_eq!(r.opt_str().unwrap(), Some("d"));
        assert_eq!(r.u64().unwrap(), 7);
        assert!(r.at_end());
        for cut in 0..out.len() {
            let mut r = Reader::new(&out[..cut], "cut");
            let all = (|| {
                r.bytes()?;
                r.opt()?;
                r.opt()?;
                r.u64()
            })();
            assert_eq!(all, Err("cut"), "cut at {cut}");
        }
    }
}
