use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};

#[derive(Debug)]
pub(crate) struct BufList<T> {
    bufs: VecDeque<T>,
    /// The bytes left in `bufs`, kept as they come and go (Wraith: summing `bufs` on every
    /// `remaining()` made each frame's decoding cost as much as the chunks buffered).
    len: usize,
}

impl<T: Buf> BufList<T> {
    pub(crate) fn new() -> BufList<T> {
        BufList {
            bufs: VecDeque::new(),
            len: 0,
        }
    }

    #[inline]
    #[allow(dead_code)]
    pub(crate) fn push(&mut self, buf: T) {
        debug_assert!(buf.has_remaining());
        self.len += buf.remaining();
        self.bufs.push_back(buf);
    }

    /// The chunks held (Wraith, for tests).
    #[cfg(test)]
    pub(crate) fn chunk_count(&self) -> usize {
        self.bufs.len()
    }

    pub fn cursor(&self) -> Cursor<T> {
        Cursor {
            buf: self,
            pos_total: 0,
            index: 0,
            pos_front: 0,
        }
    }
}

impl BufList<Bytes> {
    pub fn take_first_chunk(&mut self) -> Option<Bytes> {
        let chunk = self.bufs.pop_front()?;
        self.len -= chunk.remaining();
        Some(chunk)
    }

    pub fn take_chunk(&mut self, max_len: usize) -> Option<Bytes> {
        let chunk = self
            .bufs
            .front_mut()
            .map(|chunk| chunk.split_to(usize::min(max_len, chunk.remaining())));
        if let Some(taken) = &chunk {
            self.len -= taken.remaining();
        }

        if let Some(front) = self.bufs.front() {
            if front.remaining() == 0 {
                let _ = self.bufs.pop_front();
            }
        }
        chunk
    }

    pub fn push_bytes<T>(&mut self, buf: &mut T)
    where
        T: Buf,
    {
        debug_assert!(buf.has_remaining());
        self.len += buf.remaining();
        self.bufs.push_back(buf.copy_to_bytes(buf.remaining()))
    }
}

#[cfg(test)]
impl<T: Buf> From<T> for BufList<T> {
    fn from(b: T) -> Self {
        let mut buf = Self::new();
        buf.push(b);
        buf
    }
}

impl<T: Buf> Buf for BufList<T> {
    #[inline]
    fn remaining(&self) -> usize {
        self.len
    }

    #[inline]
    fn chunk(&self) -> &[u8] {
        self.bufs.front().map(Buf::chunk).unwrap_or_default()
    }

    #[inline]
    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.len, "advance past the end of a BufList");
        self.len -= cnt;
        while cnt > 0 {
            {
                let front = &mut self.bufs[0];
                let rem = front.remaining();
                if rem > cnt {
                    front.advance(cnt);
                    return;
                } else {
                    front.advance(rem);
                    cnt -= rem;
                }
            }
            self.bufs.pop_front();
        }
    }

    #[inline]
    fn chunks_vectored<'t>(&'t self, dst: &mut [IoSlice<'t>]) -> usize {
        if dst.is_empty() {
            return 0;
        }
        let mut vecs = 0;
        for buf in &self.bufs {
            vecs += buf.chunks_vectored(&mut dst[vecs..]);
            if vecs == dst.len() {
                break;
            }
        }
        vecs
    }
}

pub struct Cursor<'a, B> {
    buf: &'a BufList<B>,
    pos_total: usize, // position amongst all bytes
    pos_front: usize, // position in the current front buffer
    index: usize,     // current front buffer index
}

impl<'a, B: Buf> Cursor<'a, B> {
    pub fn position(&self) -> usize {
        self.pos_total
    }
}

impl<'a, B: Buf> Buf for Cursor<'a, B> {
    #[inline]
    fn remaining(&self) -> usize {
        self.buf.remaining() - self.pos_total
    }

    #[inline]
    fn chunk(&self) -> &[u8] {
        &self.buf.bufs[self.index].chunk()[self.pos_front..]
    }

    #[inline]
    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.buf.remaining() - self.pos_total);
        while cnt > 0 {
            {
                let front = &self.buf.bufs[self.index];
                let rem = front.remaining() - self.pos_front;
                if rem > cnt {
                    self.pos_total += cnt;
                    self.pos_front += cnt;
                    return;
                } else {
                    self.pos_total += rem;
                    self.pos_front = 0;
                    cnt -= rem;
                }
            }
            self.index += 1;
        }
    }

    #[inline]
    fn chunks_vectored<'t>(&'t self, dst: &mut [IoSlice<'t>]) -> usize {
        self.buf.chunks_vectored(dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// (Wraith) `remaining` is kept as chunks come and go, and matches their sum.
    #[test]
    fn buf_list_keeps_its_length() {
        let mut list = BufList::new();
        let sum = |l: &BufList<Bytes>| l.bufs.iter().map(|b| b.remaining()).sum::<usize>();
        for n in [3usize, 1, 7, 2] {
            list.push_bytes(&mut Bytes::from(vec![0u8; n]));
            assert_eq!(list.remaining(), sum(&list));
        }
        list.advance(4);
        assert_eq!(list.remaining(), 9);
        assert_eq!(list.remaining(), sum(&list));
        let c = list.take_chunk(5).unwrap();
        assert_eq!(c.len(), 5);
        assert_eq!(list.remaining(), 4);
        assert_eq!(list.remaining(), sum(&list));
        let c = list.take_first_chunk().unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(list.remaining(), 2);
        list.advance(2);
        assert_eq!(list.remaining(), 0);
        assert!(list.bufs.is_empty());
    }

    #[test]
    fn cursor_advance() {
        let buf = BufList::from(Bytes::from_static(&[1u8, 2, 3, 4]));
        let mut cur = buf.cursor();
        cur.advance(2);
        assert_eq!(cur.remaining(), 2);
        cur.advance(2);
        assert_eq!(cur.remaining(), 0);
    }
}
