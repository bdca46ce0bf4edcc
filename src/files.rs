//! Reading the files a configuration names (the config itself, certificates, keys, CRLs,
//! the decisions state file, policies and their test cases). A path can name anything: a
//! FIFO, whose `open` blocks until a writer comes (in a reload, on an async worker, that
//! froze the server), or `/dev/zero`, which never ends. So a file is opened without
//! blocking, must be a regular file, and is read only up to a size.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::path::Path;

/// The most a configuration, certificate, key or policy file may hold.
pub const SMALL: u64 = 16 << 20;
/// The most a CRL or a decisions state file may hold.
pub const LARGE: u64 = 4 << 30;

/// Opens `path` for reading: without blocking on a FIFO, and only if it is a regular file.
pub fn open_regular(path: &Path) -> io::Result<(File, Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file ({})", kind(&meta)),
        ));
    }
    Ok((file, meta))
}

/// The bytes of the regular file at `path`, at most `max` of them (more is an error).
pub fn read(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let (file, meta) = open_regular(path)?;
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        )
    };
    if meta.len() > max {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    // A file that grows while it is read (or a /proc file whose size says 0) stops at max.
    file.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(too_large());
    }
    Ok(buf)
}

/// `read`, as UTF-8 text.
pub fn read_to_string(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read(path, max)?).map_err(|e| {
        // Where, as an editor counts: lines from 1, characters from 1.
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let valid = std::str::from_utf8(valid).unwrap_or_default();
        let line = valid.matches('\n').count() + 1;
        let column = valid.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not UTF-8 text (line {line}, column {column})"),
        )
    })
}

/// What a non-regular file is, for errors.
pub fn kind(meta: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_up_to_a_size() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "hello").unwrap();
        assert_eq!(read_to_string(&file, 5).unwrap(), "hello");
        let e = read(&file, 4).unwrap_err();
        assert!(e.to_string().contains("larger than 4 bytes"), "{e}");
        let e = read(dir.path(), SMALL).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let e = read(Path::new("/dev/zero"), SMALL).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        // A FIFO with no writer: refused at once, not waited on.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read(&fifo, SMALL).unwrap_err();
        assert!(e.to_string().contains("a FIFO"), "{e}");
        let e = read(&dir.path().join("missing"), SMALL).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        std::fs::write(&file, [0xff, 0xfe]).unwrap();
        let e = read_to_string(&file, SMALL).unwrap_err();
        assert_eq!(e.to_string(), "not UTF-8 text (line 1, column 1)");
        std::fs::write(&file, b"[server]\nlog_level = \"\xc3\xa9\xff\"\n").unwrap();
        let e = read_to_string(&file, SMALL).unwrap_err();
        assert_eq!(e.to_string(), "not UTF-8 text (line 2, column 15)");
    }
}
