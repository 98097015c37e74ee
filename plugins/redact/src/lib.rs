//! Redaction: masks e-mail addresses and payment card numbers (13–19 digits, with spaces or
//! dashes, passing the Luhn check) in answers, whole or streamed, chunk by chunk.
//!
//! Configuration (optional): `{"email": "[email]", "card": "[card]"}`, the replacements.
//! A value split across two streamed chunks is not seen whole; token streams carry each word in
//! one event, so addresses and numbers arrive whole.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;
use std::rc::Rc;

#[derive(Deserialize, Clone)]
struct Config {
    #[serde(default = "email")]
    email: String,
    #[serde(default = "card")]
    card: String,
}

fn email() -> String {
    "[email]".into()
}

fn card() -> String {
    "[card]".into()
}

impl Default for Config {
    fn default() -> Self {
        Self {
            email: email(),
            card: card(),
        }
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Root {
    config: Rc<Config>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        if raw.is_empty() {
            return true;
        }
        match serde_json::from_slice(&raw) {
            Ok(c) => {
                self.config = Rc::new(c);
                true
            }
            Err(e) => {
                log::error!("redact: bad configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Answer {
            config: self.config.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Answer {
    config: Rc<Config>,
}

impl Context for Answer {}

impl HttpContext for Answer {
    fn on_http_response_headers(&mut self, _headers: usize, _end: bool) -> Action {
        // The body may change length.
        self.set_http_response_header("content-length", None);
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, _end_of_stream: bool) -> Action {
        if size == 0 {
            return Action::Continue;
        }
        let Some(chunk) = self.get_http_response_body(0, size) else {
            return Action::Continue;
        };
        let masked = redact(&chunk, &self.config);
        if masked != chunk {
            self.set_http_response_body(0, size, &masked);
        }
        Action::Continue
    }
}

fn local_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._%+-".contains(&b)
}

fn domain_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b".-".contains(&b)
}

fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum % 10 == 0
}

/// `text` with every e-mail address and card number replaced.
fn redact(text: &[u8], config: &Config) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        // An e-mail address: local@domain.tld, found from its '@'.
        if b == b'@' {
            let start = out.iter().rev().take_while(|&&c| local_char(c)).count();
            let mut end = i + 1;
            while end < text.len() && domain_char(text[end]) {
                end += 1;
            }
            // Trailing dots end a sentence, not the domain.
            while end > i + 1 && text[end - 1] == b'.' {
                end -= 1;
            }
            let domain = &text[i + 1..end];
            if start > 0 && domain.contains(&b'.') && !domain.starts_with(b".") {
                out.truncate(out.len() - start);
                out.extend_from_slice(config.email.as_bytes());
                i = end;
                continue;
            }
        }
        // A card number: 13-19 digits, single spaces or dashes between groups.
        if b.is_ascii_digit() && (i == 0 || !text[i - 1].is_ascii_digit()) {
            let mut digits = Vec::new();
            let mut end = i;
            while end < text.len() {
                let c = text[end];
                if c.is_ascii_digit() {
                    digits.push(c);
                    end += 1;
                } else if (c == b' ' || c == b'-')
                    && end + 1 < text.len()
                    && text[end + 1].is_ascii_digit()
                    && digits.len() < 19
                {
                    end += 1;
                } else {
                    break;
                }
            }
            if (13..=19).contains(&digits.len()) && luhn(&digits) {
                out.extend_from_slice(config.card.as_bytes());
                i = end;
                continue;
            }
            out.extend_from_slice(&text[i..end]);
            i = end;
            continue;
        }
        out.push(b);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_addresses_and_cards() {
        let c = Config::default();
        let r = |s: &str| String::from_utf8(redact(s.as_bytes(), &c)).unwrap();
        assert_eq!(r("mail sales@acme.example."), "mail [email].");
        assert_eq!(
            r("{\"content\":\" 4111-1111-1111-1111\"}"),
            "{\"content\":\" [card]\"}"
        );
        assert_eq!(r("4111 1111 1111 1111"), "[card]");
        assert_eq!(r("order 1234567890123 ok"), "order 1234567890123 ok");
        assert_eq!(r("worth $500K"), "worth $500K");
        assert_eq!(r("a@b"), "a@b");
    }
}
