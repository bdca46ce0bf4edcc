//! `wraith version`

use std::process::ExitCode;

pub fn run() -> ExitCode {
    println!("wraith {}", env!("CARGO_PKG_VERSION"));
    println!("git revision:  {}", env!("WRAITH_GIT_REV"));
    println!("TLS provider:  rustls 0.23 with aws-lc-rs (TLS 1.3; TLS 1.2 opt-in per listener)");
    println!("key exchange:  X25519MLKEM768 (preferred), X25519, secp256r1, secp384r1");
    println!("protocols:     HTTP/1.1, HTTP/2 (ALPN h2, h2c prior knowledge), WebSocket, HTTP/3 (QUIC, ALPN h3)");
    ExitCode::SUCCESS
}
