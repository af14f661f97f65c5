//! A growable array of plain values whose prefix may be a section of a file, mapped
//! copy-on-write: opening a collection maps its arrays instead of reading them, pages are
//! read from disk only when a search touches them, and changes to mapped values (new links,
//! tombstones) stay in memory until the next checkpoint rewrites the file.

use std::fs::File;

use bytemuck::Pod;
use memmap2::{MmapMut, MmapOptions};

pub(crate) struct Column<T> {
    /// Private (copy-on-write) map of `mapped` values; `None` when nothing is mapped.
    map: Option<MmapMut>,
    mapped: usize,
    /// Values appended after the map.
    tail: Vec<T>,
}

impl<T: Pod> Default for Column<T> {
    fn default() -> Self {
        Self::from_vec(Vec::new())
    }
}

impl<T: Pod> Column<T> {
    pub fn from_vec(values: Vec<T>) -> Self {
        Self {
            map: None,
            mapped: 0,
            tail: values,
        }
    }

    /// Maps `count` values starting at byte `offset` of `file`. The offset must keep the
    /// values aligned (the checkpoint writer aligns every section to a page).
    pub fn map(file: &File, offset: u64, count: usize) -> std::io::Result<Self> {
        if count == 0 {
            return Ok(Self::default());
        }
        let bytes = count
            .checked_mul(size_of::<T>())
            .ok_or_else(|| std::io::Error::other("section size overflows"))?;
        // SAFETY: the map is private, so writes never reach the file, and the checkpoint file
        // is only ever replaced by rename, never modified in place, so its contents cannot
        // change under the map while this process holds it.
        let map = unsafe {
            MmapOptions::new()
                .offset(offset)
                .len(bytes)
                .map_copy(file)?
        };
        // Searches jump around the file: read ahead nothing, map only the pages touched.
        let _ = map.advise(memmap2::Advice::Random);
        if bytemuck::try_cast_slice::<u8, T>(&map).is_err() {
            return Err(std::io::Error::other("section is not aligned"));
        }
        Ok(Self {
            map: Some(map),
            mapped: count,
            tail: Vec::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.mapped + self.tail.len()
    }

    fn base(&self) -> &[T] {
        self.map.as_deref().map_or(&[], bytemuck::cast_slice)
    }

    fn base_mut(&mut self) -> &mut [T] {
        self.map
            .as_deref_mut()
            .map_or(&mut [], bytemuck::cast_slice_mut)
    }

    /// `len` values from `start`; a run never spans the map and the tail, because every
    /// caller reads one node's record and the map ends on a node boundary.
    #[inline]
    pub fn slice(&self, start: usize, len: usize) -> &[T] {
        if start < self.mapped {
            &self.base()[start..start + len]
        } else {
            &self.tail[start - self.mapped..start - self.mapped + len]
        }
    }

    #[inline]
    pub fn slice_mut(&mut self, start: usize, len: usize) -> &mut [T] {
        if start < self.mapped {
            &mut self.base_mut()[start..start + len]
        } else {
            let at = start - self.mapped;
            &mut self.tail[at..at + len]
        }
    }

    #[inline]
    pub fn get(&self, index: usize) -> T {
        self.slice(index, 1)[0]
    }

    pub fn set(&mut self, index: usize, value: T) {
        self.slice_mut(index, 1)[0] = value;
    }

    pub fn extend_from_slice(&mut self, values: &[T]) {
        self.tail.extend_from_slice(values);
    }

    pub fn push(&mut self, value: T) {
        self.tail.push(value);
    }

    /// The values as (at most) two contiguous runs, for writing them out.
    pub fn runs(&self) -> [&[T]; 2] {
        [self.base(), &self.tail]
    }

    pub fn iter(&self) -> impl Iterator<Item = T> + '_ {
        self.base().iter().chain(&self.tail).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn mapped_prefix_and_owned_tail_read_and_write_as_one_array() {
        let path = std::env::temp_dir().join(format!("moera-column-{}", std::process::id()));
        let mut file = File::create(&path).unwrap();
        file.write_all(&[0u8; 4096]).unwrap();
        let values: Vec<u32> = (0..10).collect();
        file.write_all(bytemuck::cast_slice(&values)).unwrap();
        drop(file);
        let file = File::open(&path).unwrap();
        let mut column = Column::<u32>::map(&file, 4096, 10).unwrap();
        column.extend_from_slice(&[10, 11]);
        assert_eq!(column.len(), 12);
        assert_eq!(
            column.iter().collect::<Vec<_>>(),
            (0..12).collect::<Vec<_>>()
        );
        column.set(3, 99);
        column.set(11, 77);
        assert_eq!(column.slice(2, 3), &[2, 99, 4]);
        assert_eq!(column.get(11), 77);
        // Writes stay private: the file still holds the original values.
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[4096 + 12..4096 + 16], &3u32.to_le_bytes());
        assert!(Column::<u32>::map(&file, 4098, 2).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
