//! SSE decoding throughput: `cargo bench --bench sse`.
//!
//! Feeds the captured chatflow stream (many times over) through the frame decoder and the event
//! decoder, in network-sized and in tiny chunks, and prints MB/s, frames/s and peak RSS.

use std::time::Instant;

use rechat::dify::events::decode;
use rechat::dify::sse::{Decoder, Frame};

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn run(label: &str, bytes: &[u8], chunk: usize, parse_json: bool) {
    let start = Instant::now();
    let mut decoder = Decoder::new();
    let mut frames = Vec::new();
    let (mut count, mut events) = (0usize, 0usize);
    for piece in bytes.chunks(chunk) {
        decoder.push(piece, &mut frames);
        for frame in frames.drain(..) {
            count += 1;
            if let (true, Frame::Data { data, .. }) = (parse_json, frame) {
                events += usize::from(decode(&data).is_ok());
            }
        }
    }
    decoder.finish(&mut frames);
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{label:<34} {:>8.1} MB/s {:>10.0} frames/s ({count} frames, {events} events decoded)",
        bytes.len() as f64 / secs / 1e6,
        count as f64 / secs
    );
}

fn main() {
    let transcript = include_str!("../tests/fixtures/dify/chatflow.sse");
    let bytes = transcript.repeat(1000).into_bytes();
    println!(
        "input: {:.1} MB of captured chatflow stream",
        bytes.len() as f64 / 1e6
    );
    run("frames, 16 KiB chunks", &bytes, 16 * 1024, false);
    run("frames, 7-byte chunks", &bytes, 7, false);
    run("frames + typed events, 16 KiB", &bytes, 16 * 1024, true);
    run("frames + typed events, 7-byte", &bytes, 7, true);
    if let Some(kib) = peak_rss_kib() {
        println!(
            "peak RSS: {:.1} MiB (includes the {:.1} MB input)",
            kib as f64 / 1024.0,
            bytes.len() as f64 / 1e6
        );
    }
}
