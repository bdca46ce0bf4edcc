//! Hand-written HTTP/2 frames, for clients that send what no HTTP/2 library would: malformed
//! heads, floods of resets, CONTINUATION without end. Shared by `h2_hostile` and `h2_floods`.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The client connection preface, then an empty SETTINGS frame.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// An HPACK string literal, without Huffman coding.
pub fn hpack_string(s: &[u8], out: &mut Vec<u8>) {
    let len = s.len();
    if len < 127 {
        out.push(len as u8);
    } else {
        out.push(127);
        let mut rest = len - 127;
        while rest >= 128 {
            out.push((rest % 128) as u8 | 0x80);
            rest /= 128;
        }
        out.push(rest as u8);
    }
    out.extend_from_slice(s);
}

/// A header block of literal fields (never indexed, new names), as a client that does not
/// care what h2 accepts would encode it.
pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x10);
        hpack_string(name.as_bytes(), &mut out);
        hpack_string(value.as_bytes(), &mut out);
    }
    out
}

/// HEADERS (and CONTINUATION frames past 16 KiB) carrying `block` on `stream`, END_STREAM.
pub fn headers_frames(stream: u32, block: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let chunks: Vec<&[u8]> = block.chunks(16 << 10).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let (ty, mut flags) = if i == 0 { (1u8, 0x1u8) } else { (9, 0) };
        if i + 1 == chunks.len() {
            flags |= 0x4;
        }
        out.extend_from_slice(&frame(ty, flags, stream, chunk));
    }
    out
}

/// One frame of type `ty` with `flags` on `stream`.
pub fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[ty, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// RST_STREAM on `stream` with error code `code`.
pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(3, 0, stream, &code.to_be_bytes())
}

/// A PING (not an ACK) carrying `data`.
pub fn ping(data: [u8; 8]) -> Vec<u8> {
    frame(6, 0, 0, &data)
}

/// One frame: its type, flags, stream and payload; `None` at the end of the connection.
pub async fn read_frame(
    rd: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    rd.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0; len];
    rd.read_exact(&mut payload).await.ok()?;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Some((head[3], head[4], stream, payload))
}

/// A TLS connection to the gateway's https listener that negotiated `h2`, the client
/// preface and an empty SETTINGS already sent: frames from here are the test's own.
pub async fn h2_raw_tls(
    wraith: &super::Wraith,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = super::tls_client_config(&wraith.pki().ca_pem, &[b"h2"], None);
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(wraith.addr("https"))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls.write_all(PREFACE).await.unwrap();
    tls
}
