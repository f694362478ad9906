//! A Server-Sent Events decoder that yields the same frames however the bytes are chunked.
//!
//! Bytes are buffered and split into lines first; a line is decoded as UTF-8 only once it is
//! whole, so a multi-byte character split across chunks is never mangled (`\r` and `\n` never
//! occur inside a UTF-8 sequence). Lines end in `\n`, `\r\n` or `\r`; a blank line ends a frame.

/// One dispatched SSE frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `event: ping` with no data: Dify's keep-alive.
    Ping,
    /// A frame with data (several `data:` lines joined by `\n`) and its optional `event:` name.
    Data { event: Option<String>, data: String },
}

#[derive(Debug, Default)]
pub struct Decoder {
    buffer: Vec<u8>,
    /// Where the next scan for a line end starts.
    scanned: usize,
    event: Option<String>,
    data: Option<String>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk and appends every frame it completes to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Frame>) {
        self.buffer.extend_from_slice(chunk);
        let mut start = 0;
        let mut i = self.scanned;
        while i < self.buffer.len() {
            match self.buffer[i] {
                b'\n' => {
                    self.line(start, i, out);
                    start = i + 1;
                }
                b'\r' => {
                    // `\r\n` is one line end; a `\r` at the very end must wait for the next byte.
                    if i + 1 == self.buffer.len() {
                        break;
                    }
                    self.line(start, i, out);
                    if self.buffer[i + 1] == b'\n' {
                        i += 1;
                    }
                    start = i + 1;
                }
                _ => {}
            }
            i += 1;
        }
        self.buffer.drain(..start);
        self.scanned = i - start;
    }

    /// Ends the stream. A trailing `\r` counts as a line end; an unterminated frame is dropped
    /// (as the SSE specification says), and `true` is returned if one was pending.
    pub fn finish(&mut self, out: &mut Vec<Frame>) -> bool {
        if self.buffer.last() == Some(&b'\r') {
            self.push(b"\n", out);
        }
        let pending = !self.buffer.is_empty() || self.data.is_some() || self.event.is_some();
        *self = Self::default();
        pending
    }

    fn line(&mut self, start: usize, end: usize, out: &mut Vec<Frame>) {
        let line = &self.buffer[start..end];
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(0) => return, // a comment
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(&value);
                }
                None => self.data = Some(value.into_owned()),
            },
            b"event" => self.event = Some(value.into_owned()),
            _ => {} // id, retry and unknown fields carry nothing Dify uses
        }
    }

    fn dispatch(&mut self, out: &mut Vec<Frame>) {
        let event = self.event.take();
        match self.data.take() {
            Some(data) => out.push(Frame::Data { event, data }),
            None if event.as_deref() == Some("ping") => out.push(Frame::Ping),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_chunks(chunks: &[&[u8]]) -> Vec<Frame> {
        let mut decoder = Decoder::new();
        let mut out = Vec::new();
        for chunk in chunks {
            decoder.push(chunk, &mut out);
        }
        decoder.finish(&mut out);
        out
    }

    fn data(s: &str) -> Frame {
        Frame::Data {
            event: None,
            data: s.to_owned(),
        }
    }

    #[test]
    fn frames_pings_and_spacing() {
        let frames = decode_chunks(&[b"event: ping\n\ndata: {\"a\":1}\n\ndata:{\"b\":2}\n\n"]);
        assert_eq!(
            frames,
            vec![Frame::Ping, data("{\"a\":1}"), data("{\"b\":2}")]
        );
    }

    #[test]
    fn crlf_and_cr_line_ends() {
        let frames = decode_chunks(&[b"data: x\r\n\r\nevent: ping\r\rdata: y\r", b"\n\r\n"]);
        assert_eq!(frames, vec![data("x"), Frame::Ping, data("y")]);
    }

    #[test]
    fn multi_line_data_comments_and_named_events() {
        let frames = decode_chunks(&[b": hello\nid: 1\nevent: message\ndata: a\ndata: b\n\n"]);
        assert_eq!(
            frames,
            vec![Frame::Data {
                event: Some("message".into()),
                data: "a\nb".into()
            }]
        );
    }

    #[test]
    fn utf8_split_inside_a_character() {
        let bytes = "data: {\"answer\":\"你好😀\"}\n\n".as_bytes();
        for cut in 0..bytes.len() {
            let frames = decode_chunks(&[&bytes[..cut], &bytes[cut..]]);
            assert_eq!(
                frames,
                vec![data("{\"answer\":\"你好😀\"}")],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn unterminated_trailing_frame_is_reported_not_emitted() {
        let mut decoder = Decoder::new();
        let mut out = Vec::new();
        decoder.push(b"data: whole\n\ndata: {\"cut", &mut out);
        assert!(decoder.finish(&mut out));
        assert_eq!(out, vec![data("whole")]);
    }

    const TRANSCRIPTS: &[&str] = &[
        include_str!("../../tests/fixtures/dify/chat-basic.sse"),
        include_str!("../../tests/fixtures/dify/chatflow.sse"),
        include_str!("../../tests/fixtures/dify/workflow-run.sse"),
        include_str!("../../tests/fixtures/dify/agent-chat-tool-call.sse"),
        include_str!("../../tests/fixtures/dify/chat-error-midstream.sse"),
        include_str!("../../tests/fixtures/dify/chatflow-node-failed.sse"),
    ];

    #[test]
    fn every_single_split_of_every_transcript_gives_the_same_frames() {
        for transcript in TRANSCRIPTS {
            let bytes = transcript.as_bytes();
            let whole = decode_chunks(&[bytes]);
            assert!(whole.len() > 3);
            for cut in 0..=bytes.len() {
                assert_eq!(decode_chunks(&[&bytes[..cut], &bytes[cut..]]), whole);
            }
            let crlf = transcript.replace('\n', "\r\n");
            assert_eq!(decode_chunks(&[crlf.as_bytes()]), whole);
        }
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_frames(
            which in 0..TRANSCRIPTS.len(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..40),
            crlf in any::<bool>(),
        ) {
            let text = if crlf { TRANSCRIPTS[which].replace('\n', "\r\n") } else { TRANSCRIPTS[which].to_owned() };
            let bytes = text.as_bytes();
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut last = 0;
            for p in points {
                chunks.push(&bytes[last..p]);
                last = p;
            }
            chunks.push(&bytes[last..]);
            prop_assert_eq!(decode_chunks(&chunks), decode_chunks(&[bytes]));
        }
    }
}
