//! The SMTP server side of one connection, as a state machine without I/O.
//!
//! [`Session::feed`] consumes bytes from the connection's input buffer and appends replies to
//! [`Session::out`]. It stops when it needs more input, when a message is complete (the caller
//! decides its fate, possibly after a delay, and answers with [`Session::reply`]), or when the
//! connection must close. Keeping I/O out makes every protocol rule testable with byte strings, lets
//! the caller answer a whole pipelined group with one write (RFC 2920 section 3.2), and means a split
//! of the input at any byte gives the same result as one big read (tested below).

/// Longest command line accepted, without its CRLF. RFC 5321 asks for 512; clients with long
/// parameter lists exceed that, and a sink should not be the pickier party.
pub(crate) const MAX_LINE: usize = 4096;
/// The SIZE we advertise; larger messages are read to the end and answered 552.
pub(crate) const MAX_MESSAGE_SIZE: u64 = 52_428_800;
/// Recipients per transaction (RFC 5321 4.5.3.1.8 asks for at least 100).
pub(crate) const MAX_RECIPIENTS: usize = 1000;
/// Bad commands tolerated on one connection before it is closed with 421.
const MAX_ERRORS: u32 = 20;

/// A message that reached its final dot.
#[derive(Debug)]
pub(crate) struct Received {
    /// The reverse path without angle brackets (empty for the null sender).
    pub mail_from: String,
    /// The forward paths without angle brackets, in the order given.
    pub rcpt: Vec<String>,
    /// The content after dot-unstuffing, CRLF line ends as received, without the final `.CRLF`.
    /// Empty when the session was created with `keep_body == false`.
    pub data: Vec<u8>,
    /// Length of the content after dot-unstuffing (known even when the body is not kept).
    pub size: u64,
}

/// Why [`Session::feed`] returned.
#[derive(Debug)]
pub(crate) enum Event {
    /// All complete input was consumed; read more, after flushing [`Session::out`].
    NeedInput,
    /// A message is complete; answer it with [`Session::reply`], then feed the rest of the input.
    Message(Received),
    /// Flush [`Session::out`] and close the connection.
    Close,
}

enum Phase {
    Command,
    /// Inside an overlong command line: skip to its end, then answer 500.
    Discarding,
    Data(DataState),
}

struct DataState {
    /// The next byte begins a line, so a leading dot is either stuffing or the terminator.
    at_line_start: bool,
    oversize: bool,
}

struct Transaction {
    mail_from: String,
    rcpt: Vec<String>,
    data: Vec<u8>,
    size: u64,
}

enum Flow {
    Continue,
    Close,
}

/// One SMTP connection's protocol state.
pub(crate) struct Session {
    name: String,
    keep_body: bool,
    greeted: bool,
    tx: Option<Transaction>,
    phase: Phase,
    errors: u32,
    /// Replies not yet written to the peer.
    pub out: Vec<u8>,
}

impl Session {
    /// A new session whose greeting is already in [`Session::out`]. `keep_body` decides whether
    /// message content is collected (only needed when messages are dumped).
    pub fn new(name: &str, keep_body: bool) -> Self {
        let mut s = Session {
            name: name.to_owned(),
            keep_body,
            greeted: false,
            tx: None,
            phase: Phase::Command,
            errors: 0,
            out: Vec::with_capacity(512),
        };
        s.reply(&format!("220 {name} ESMTP governor-sink"));
        s
    }

    /// Appends one reply line (CRLF added).
    pub fn reply(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// Consumes as much of `input` as can be acted on; returns how many bytes were consumed and
    /// why it stopped. Unconsumed bytes must be offered again, followed by new input.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Event) {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match &mut self.phase {
                Phase::Command => match rest.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        pos += i + 1;
                        let line = rest[..i].strip_suffix(b"\r").unwrap_or(&rest[..i]);
                        let flow = if line.len() > MAX_LINE {
                            self.error("500 5.5.2 Error: line too long")
                        } else {
                            self.command(line)
                        };
                        if let Flow::Close = flow {
                            return (pos, Event::Close);
                        }
                    }
                    None => {
                        // +1: the CR of a line of exactly MAX_LINE may have arrived without its LF.
                        if rest.len() > MAX_LINE + 1 {
                            self.phase = Phase::Discarding;
                            pos = input.len();
                        }
                        return (pos, Event::NeedInput);
                    }
                },
                Phase::Discarding => match rest.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        pos += i + 1;
                        self.phase = Phase::Command;
                        if let Flow::Close = self.error("500 5.5.2 Error: line too long") {
                            return (pos, Event::Close);
                        }
                    }
                    None => return (input.len(), Event::NeedInput),
                },
                Phase::Data(state) => {
                    if state.at_line_start {
                        if rest.first() == Some(&b'.') {
                            if rest.starts_with(b".\r\n") {
                                pos += 3;
                                if let Some(event) = self.end_of_data() {
                                    return (pos, event);
                                }
                                continue;
                            }
                            if b".\r\n".starts_with(rest) {
                                return (pos, Event::NeedInput); // "." or ".\r": wait and see
                            }
                            pos += 1; // a stuffing dot (RFC 5321 4.5.2)
                        } else if rest.is_empty() {
                            return (pos, Event::NeedInput);
                        }
                        state.at_line_start = false;
                        continue;
                    }
                    // Copy up to and including the next CRLF. Without one, copy everything but a
                    // trailing CR, whose LF may be in the next read: a CRLF is never split between
                    // two calls, so a line start is never missed and the buffer never grows.
                    let (take, line_ends) = match find_crlf(rest) {
                        Some(i) => (i + 2, true),
                        None => (rest.len() - usize::from(rest.ends_with(b"\r")), false),
                    };
                    state.at_line_start = line_ends;
                    let oversize = &mut state.oversize;
                    if let Some(tx) = &mut self.tx {
                        tx.size += take as u64;
                        if tx.size > MAX_MESSAGE_SIZE {
                            *oversize = true;
                            tx.data = Vec::new();
                        } else if self.keep_body {
                            tx.data.extend_from_slice(&rest[..take]);
                        }
                    }
                    pos += take;
                    if !line_ends {
                        return (pos, Event::NeedInput);
                    }
                }
            }
        }
    }

    /// The final dot was read: the transaction ends whatever the answer will be.
    fn end_of_data(&mut self) -> Option<Event> {
        let oversize = matches!(&self.phase, Phase::Data(d) if d.oversize);
        self.phase = Phase::Command;
        let tx = self.tx.take()?;
        if oversize {
            self.reply("552 5.3.4 Error: message size exceeds fixed limit");
            return None;
        }
        Some(Event::Message(Received {
            mail_from: tx.mail_from,
            rcpt: tx.rcpt,
            data: tx.data,
            size: tx.size,
        }))
    }

    /// Answers a client error; too many of them end the connection.
    fn error(&mut self, line: &str) -> Flow {
        self.reply(line);
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            let msg = format!("421 4.7.0 {} Error: too many errors", self.name);
            self.reply(&msg);
            return Flow::Close;
        }
        Flow::Continue
    }

    fn command(&mut self, line: &[u8]) -> Flow {
        let (verb, arg) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], trim(&line[i + 1..])),
            None => (line, &b""[..]),
        };
        let is = |name: &str| verb.eq_ignore_ascii_case(name.as_bytes());
        if is("EHLO") || is("HELO") {
            if arg.is_empty() {
                return self.error("501 5.5.4 Syntax: EHLO hostname");
            }
            self.greeted = true;
            self.tx = None;
            if is("HELO") {
                let msg = format!("250 {}", self.name);
                self.reply(&msg);
            } else {
                let msg = format!("250-{} Hello {}", self.name, String::from_utf8_lossy(arg));
                self.reply(&msg);
                self.reply("250-PIPELINING");
                self.reply("250-8BITMIME");
                self.reply("250-SMTPUTF8");
                self.reply(&format!("250-SIZE {MAX_MESSAGE_SIZE}"));
                self.reply("250 ENHANCEDSTATUSCODES");
            }
        } else if is("MAIL") {
            if !self.greeted {
                return self.error("503 5.5.1 Error: send HELO/EHLO first");
            }
            if self.tx.is_some() {
                return self.error("503 5.5.1 Error: nested MAIL command");
            }
            let Some((addr, params)) = parse_path(arg, b"FROM:") else {
                return self.error("501 5.5.4 Syntax: MAIL FROM:<address>");
            };
            for param in params.split(|&b| b == b' ').filter(|p| !p.is_empty()) {
                if let Err(reply) = check_mail_param(param) {
                    return self.error(reply);
                }
            }
            self.tx = Some(Transaction {
                mail_from: addr,
                rcpt: Vec::new(),
                data: Vec::new(),
                size: 0,
            });
            self.reply("250 2.1.0 Ok");
        } else if is("RCPT") {
            let Some(count) = self.tx.as_ref().map(|tx| tx.rcpt.len()) else {
                return self.error("503 5.5.1 Error: need MAIL command");
            };
            let Some((addr, params)) = parse_path(arg, b"TO:") else {
                return self.error("501 5.5.4 Syntax: RCPT TO:<address>");
            };
            if addr.is_empty() {
                return self.error("501 5.1.3 Error: null recipient");
            }
            if !trim(params).is_empty() {
                return self.error("555 5.5.4 Error: unsupported RCPT parameter");
            }
            if count >= MAX_RECIPIENTS {
                self.reply("452 4.5.3 Error: too many recipients");
                return Flow::Continue;
            }
            if let Some(tx) = &mut self.tx {
                tx.rcpt.push(addr);
            }
            self.reply("250 2.1.5 Ok");
        } else if is("DATA") {
            match &self.tx {
                None => return self.error("503 5.5.1 Error: need MAIL command"),
                Some(tx) if tx.rcpt.is_empty() => {
                    return self.error("503 5.5.1 Error: need RCPT command");
                }
                Some(_) if !arg.is_empty() => return self.error("501 5.5.4 Syntax: DATA"),
                Some(_) => {}
            }
            self.phase = Phase::Data(DataState {
                at_line_start: true,
                oversize: false,
            });
            self.reply("354 End data with <CR><LF>.<CR><LF>");
        } else if is("RSET") {
            self.tx = None;
            self.reply("250 2.0.0 Ok");
        } else if is("NOOP") {
            self.reply("250 2.0.0 Ok");
        } else if is("QUIT") {
            self.reply("221 2.0.0 Bye");
            return Flow::Close;
        } else if is("VRFY") {
            self.reply("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery");
        } else if is("HELP") {
            self.reply("214 2.0.0 governor-sink: see RFC 5321");
        } else {
            return self.error("500 5.5.1 Error: command not recognized");
        }
        Flow::Continue
    }
}

/// Parses `FROM:<addr> params` (or `TO:`), allowing spaces after the colon as many clients send.
fn parse_path<'a>(arg: &'a [u8], keyword: &[u8]) -> Option<(String, &'a [u8])> {
    if arg.len() < keyword.len() || !arg[..keyword.len()].eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = trim(&arg[keyword.len()..]).strip_prefix(b"<")?;
    let close = rest.iter().position(|&b| b == b'>')?;
    let params = &rest[close + 1..];
    if !params.is_empty() && params[0] != b' ' {
        return None;
    }
    Some((String::from_utf8_lossy(&rest[..close]).into_owned(), params))
}

/// Accepts the MAIL parameters of the extensions we advertise.
fn check_mail_param(param: &[u8]) -> Result<(), &'static str> {
    let (key, value) = match param.iter().position(|&b| b == b'=') {
        Some(i) => (&param[..i], Some(&param[i + 1..])),
        None => (param, None),
    };
    if key.eq_ignore_ascii_case(b"BODY") {
        match value {
            Some(v) if v.eq_ignore_ascii_case(b"7BIT") || v.eq_ignore_ascii_case(b"8BITMIME") => {
                Ok(())
            }
            _ => Err("501 5.5.4 Error: BODY must be 7BIT or 8BITMIME"),
        }
    } else if key.eq_ignore_ascii_case(b"SMTPUTF8") && value.is_none() {
        Ok(())
    } else if key.eq_ignore_ascii_case(b"SIZE") {
        let size = value
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or("501 5.5.4 Error: bad SIZE value")?;
        if size > MAX_MESSAGE_SIZE {
            return Err("552 5.3.4 Error: message size exceeds fixed limit");
        }
        Ok(())
    } else {
        Err("555 5.5.4 Error: unsupported MAIL parameter")
    }
}

fn trim(s: &[u8]) -> &[u8] {
    s.trim_ascii()
}

/// Index of the first CRLF in `s`.
fn find_crlf(s: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].iter().position(|&b| b == b'\n') {
        let i = from + i;
        if i > 0 && s[i - 1] == b'\r' {
            return Some(i - 1);
        }
        from = i + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a session the way the server does, with `input` arriving in the given chunks and
    /// every message accepted. Returns everything written and the messages received.
    fn drive(chunks: &[&[u8]]) -> (String, Vec<Received>, bool) {
        let mut s = Session::new("sink.test", true);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut messages = Vec::new();
        let mut closed = false;
        'outer: for chunk in chunks {
            buf.extend_from_slice(chunk);
            let mut pos = 0;
            loop {
                let (used, event) = s.feed(&buf[pos..]);
                pos += used;
                match event {
                    Event::NeedInput => break,
                    Event::Close => {
                        closed = true;
                        out.append(&mut s.out);
                        break 'outer;
                    }
                    Event::Message(m) => {
                        messages.push(m);
                        s.reply("250 2.0.0 Ok");
                    }
                }
            }
            buf.drain(..pos);
            out.append(&mut s.out);
        }
        (String::from_utf8(out).unwrap(), messages, closed)
    }

    fn codes(out: &str) -> Vec<&str> {
        out.split("\r\n")
            .filter(|l| l.len() >= 4 && l.as_bytes()[3] == b' ')
            .map(|l| &l[..3])
            .collect()
    }

    const TRANSACTION: &[u8] = b"EHLO client.test\r\n\
        MAIL FROM:<a@example.org> BODY=8BITMIME SMTPUTF8 SIZE=200\r\n\
        RCPT TO:<b@example.org>\r\n\
        RCPT TO: <c@example.org>\r\n\
        DATA\r\n\
        Subject: dots\r\n\r\n..x\r\n..\r\n.\r.\r\nbare\nlf\r\n...\r\nend\r\n.\r\n\
        NOOP\r\nQUIT\r\n";

    const UNSTUFFED: &[u8] = b"Subject: dots\r\n\r\n.x\r\n.\r\n\r.\r\nbare\nlf\r\n..\r\nend\r\n";

    #[test]
    fn transaction_in_one_read() {
        let (out, messages, closed) = drive(&[TRANSACTION]);
        assert_eq!(
            codes(&out),
            [
                "220", "250", "250", "250", "250", "354", "250", "250", "221"
            ]
        );
        assert!(closed);
        assert_eq!(messages.len(), 1);
        let m = &messages[0];
        assert_eq!(m.mail_from, "a@example.org");
        assert_eq!(m.rcpt, ["b@example.org", "c@example.org"]);
        assert_eq!(m.data, UNSTUFFED);
        assert_eq!(m.size, UNSTUFFED.len() as u64);
    }

    #[test]
    fn every_split_point_gives_the_same_result() {
        let (whole, _, _) = drive(&[TRANSACTION]);
        for at in 0..TRANSACTION.len() {
            let (out, messages, _) = drive(&[&TRANSACTION[..at], &TRANSACTION[at..]]);
            assert_eq!(out, whole, "split at {at}");
            assert_eq!(messages[0].data, UNSTUFFED, "split at {at}");
        }
        let bytes: Vec<&[u8]> = TRANSACTION.chunks(1).collect();
        let (out, messages, _) = drive(&bytes);
        assert_eq!(out, whole);
        assert_eq!(messages[0].data, UNSTUFFED);
    }

    #[test]
    fn empty_message_and_dot_lines() {
        let (_, m, _) = drive(&[b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<r@x>\r\nDATA\r\n.\r\n"]);
        assert_eq!(m[0].data, b"");
        assert_eq!(m[0].mail_from, "");
        let (_, m, _) = drive(&[b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<r@x>\r\nDATA\r\n..\r\n.\r\n"]);
        assert_eq!(m[0].data, b".\r\n");
        // ".x" without stuffing (a lax client) loses its dot, as in every MTA.
        let (_, m, _) = drive(&[b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<r@x>\r\nDATA\r\n.x\r\n.\r\n"]);
        assert_eq!(m[0].data, b"x\r\n");
    }

    #[test]
    fn sequence_and_syntax_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"MAIL FROM:<a@x>\r\n", "503 5.5.1"),
            (b"HELO x\r\nRCPT TO:<a@x>\r\n", "503 5.5.1"),
            (b"HELO x\r\nDATA\r\n", "503 5.5.1"),
            (b"HELO x\r\nMAIL FROM:<a@x>\r\nDATA\r\n", "503 5.5.1"),
            (
                b"HELO x\r\nMAIL FROM:<a@x>\r\nMAIL FROM:<a@x>\r\n",
                "503 5.5.1",
            ),
            (
                b"HELO x\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nRSET\r\nDATA\r\n",
                "503 5.5.1",
            ),
            (b"XYZZY\r\n", "500 5.5.1"),
            (b"\r\n", "500 5.5.1"),
            (b"EHLO\r\n", "501 5.5.4"),
            (b"HELO x\r\nMAIL FROM:a@x\r\n", "501 5.5.4"),
            (b"HELO x\r\nMAIL FROM:<a@x> AUTH=<>\r\n", "555 5.5.4"),
            (
                b"HELO x\r\nMAIL FROM:<a@x> BODY=BINARYMIME\r\n",
                "501 5.5.4",
            ),
            (b"HELO x\r\nMAIL FROM:<a@x> SIZE=52428801\r\n", "552 5.3.4"),
            (b"HELO x\r\nMAIL FROM:<a@x>\r\nRCPT TO:<>\r\n", "501 5.1.3"),
            (
                b"HELO x\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x> NOTIFY=NEVER\r\n",
                "555 5.5.4",
            ),
            (b"VRFY postmaster\r\n", "252 2.5.0"),
            (b"NOOP\r\n", "250 2.0.0"),
            (b"rset\r\n", "250 2.0.0"),
        ];
        for (input, want) in cases {
            let (out, _, _) = drive(&[input]);
            let last = out.trim_end().rsplit("\r\n").next().unwrap();
            assert!(
                last.starts_with(want),
                "{:?}: got {last:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn overlong_command_line_is_refused_and_the_session_goes_on() {
        for len in [MAX_LINE + 1, MAX_LINE + 3, 3 * MAX_LINE] {
            let long = format!("NOOP {}\r\n", "x".repeat(len));
            let (whole, _, _) = drive(&[long.as_bytes(), b"NOOP\r\n"]);
            assert_eq!(codes(&whole), ["220", "500", "250"], "len {len}");
            let chunks: Vec<&[u8]> = long.as_bytes().chunks(1000).collect();
            let (split, _, _) = drive(&chunks);
            assert_eq!(codes(&split), ["220", "500"], "len {len}");
        }
        let exact = format!("NOOP {}\r\n", "x".repeat(MAX_LINE - 5));
        let (out, _, _) = drive(&[exact.as_bytes()]);
        assert_eq!(codes(&out), ["220", "250"]);
    }

    #[test]
    fn too_many_errors_close_the_connection() {
        let input = b"BAD\r\n".repeat(MAX_ERRORS as usize + 5);
        let (out, _, closed) = drive(&[&input]);
        assert!(closed);
        assert!(out.trim_end().ends_with("Error: too many errors"));
    }

    #[test]
    fn oversize_message_is_read_to_the_end_and_refused() {
        let mut s = Session::new("sink.test", false);
        let (_, e) = s.feed(b"HELO x\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n");
        assert!(matches!(e, Event::NeedInput));
        let line = [b'x'; 998]
            .iter()
            .chain(b"\r\n")
            .copied()
            .collect::<Vec<u8>>();
        let mut sent = 0;
        while sent <= MAX_MESSAGE_SIZE {
            let (used, e) = s.feed(&line);
            assert_eq!(used, line.len());
            assert!(matches!(e, Event::NeedInput));
            sent += line.len() as u64;
        }
        s.out.clear();
        let (_, e) = s.feed(b".\r\nNOOP\r\n");
        assert!(matches!(e, Event::NeedInput));
        assert_eq!(
            s.out,
            b"552 5.3.4 Error: message size exceeds fixed limit\r\n250 2.0.0 Ok\r\n"
        );
    }

    #[test]
    fn ehlo_advertises_the_extensions() {
        let (out, _, _) = drive(&[b"EHLO c\r\n"]);
        assert_eq!(
            out,
            "220 sink.test ESMTP governor-sink\r\n250-sink.test Hello c\r\n250-PIPELINING\r\n\
             250-8BITMIME\r\n250-SMTPUTF8\r\n250-SIZE 52428800\r\n250 ENHANCEDSTATUSCODES\r\n"
        );
    }

    #[test]
    fn body_is_not_kept_unless_asked() {
        let mut s = Session::new("n", false);
        let (_, e) = s.feed(b"HELO x\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nabc\r\n.\r\n");
        let Event::Message(m) = e else {
            panic!("{e:?}")
        };
        assert!(m.data.is_empty());
        assert_eq!(m.size, 5);
    }
}
