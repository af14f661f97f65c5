//! Plain text out of the document formats ingestion reads: text, Markdown and HTML.
//!
//! HTML is read with a small tolerant scanner rather than a full parser: it keeps the text
//! of `<main>` (or of the whole body when a page has none), drops scripts, styles, navigation
//! and forms, turns block elements into paragraph breaks, keeps `<pre>` blocks verbatim and
//! decodes character references. Pages that ask robots not to index them (`<meta
//! name="robots" content="noindex">`, as mdBook's print page does) are reported as such.

/// A document's text and title.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub title: Option<String>,
    pub text: String,
}

/// Why a file yields no document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoText {
    /// It holds NUL bytes or is not UTF-8.
    Binary,
    /// An HTML page marked `noindex`.
    NoIndex,
    /// An HTML page that only redirects elsewhere (`<meta http-equiv="refresh">`).
    Redirect,
    /// Nothing but whitespace or markup.
    Empty,
}

/// The formats read, by file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Markdown,
    Html,
}

impl Format {
    /// The format of a file named with `extension` (any case), if ingestion reads it.
    pub fn from_extension(extension: &str) -> Option<Self> {
        match extension.to_ascii_lowercase().as_str() {
            "txt" | "text" => Some(Self::Text),
            "md" | "markdown" => Some(Self::Markdown),
            "html" | "htm" | "xhtml" => Some(Self::Html),
            _ => None,
        }
    }
}

/// The text of a file's `bytes` in `format`.
pub fn extract(bytes: &[u8], format: Format) -> Result<Extracted, NoText> {
    if bytes.contains(&0) {
        return Err(NoText::Binary);
    }
    let source = std::str::from_utf8(bytes).map_err(|_| NoText::Binary)?;
    let source = source.strip_prefix('\u{feff}').unwrap_or(source);
    let extracted = match format {
        Format::Text => Extracted {
            title: None,
            text: normalize_paragraphs(source),
        },
        Format::Markdown => Extracted {
            title: markdown_title(source),
            text: normalize_paragraphs(source),
        },
        Format::Html => html_to_text(source)?,
    };
    if extracted.text.trim().is_empty() {
        return Err(NoText::Empty);
    }
    Ok(extracted)
}

/// The first ATX (`# Title`) or setext (`Title\n====`) heading.
fn markdown_title(source: &str) -> Option<String> {
    let lines: Vec<&str> = source.lines().collect();
    let mut in_fence = false;
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim();
        // Lines of code blocks (`#include`, shell comments) are not headings.
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        // CommonMark: one to six `#` and then a space (or nothing).
        let hashes = trimmed.len() - trimmed.trim_start_matches('#').len();
        let rest = &trimmed[hashes..];
        if (1..=6).contains(&hashes) && (rest.is_empty() || rest.starts_with([' ', '\t'])) {
            let title = rest.trim().trim_end_matches('#').trim();
            if !title.is_empty() {
                return Some(title.to_string());
            }
        }
        let underline = lines.get(i + 1).map(|l| l.trim()).unwrap_or_default();
        if !trimmed.is_empty() && underline.len() >= 3 && underline.chars().all(|c| c == '=') {
            return Some(trimmed.to_string());
        }
    }
    None
}

/// Line endings as `\n`, trailing spaces dropped, and runs of blank lines as one blank line
/// (the paragraph separator the chunker splits on).
fn normalize_paragraphs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0;
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            blank_run += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank_run > 0 { "\n\n" } else { "\n" });
        }
        blank_run = 0;
        out.push_str(line);
    }
    out
}

/// Elements whose content is not text of the page.
const SKIPPED: &[&str] = &[
    "script", "style", "nav", "noscript", "template", "svg", "button", "select", "textarea",
    "iframe", "object", "head",
];
/// Elements that start and end a paragraph.
const BLOCKS: &[&str] = &[
    "p",
    "div",
    "section",
    "article",
    "main",
    "header",
    "footer",
    "aside",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "ul",
    "ol",
    "li",
    "dl",
    "dt",
    "dd",
    "table",
    "tr",
    "blockquote",
    "pre",
    "figure",
    "figcaption",
    "hr",
    "form",
    "details",
    "summary",
];

/// Text collected from one region of the page.
#[derive(Default)]
struct TextSink {
    text: String,
    /// A space is owed before the next word.
    pending_space: bool,
    /// A paragraph break is owed before the next word.
    pending_break: bool,
}

impl TextSink {
    fn push_text(&mut self, text: &str, verbatim: bool) {
        if verbatim {
            if text.is_empty() {
                return;
            }
            self.flush_separator();
            self.text.push_str(text);
            return;
        }
        for (i, word) in text.split_whitespace().enumerate() {
            if i > 0 || text.starts_with(char::is_whitespace) {
                self.pending_space = true;
            }
            self.flush_separator();
            self.text.push_str(word);
        }
        if text.ends_with(char::is_whitespace) {
            self.pending_space = true;
        }
    }

    fn flush_separator(&mut self) {
        if self.text.is_empty() {
        } else if self.pending_break {
            self.text.push_str("\n\n");
        } else if self.pending_space {
            self.text.push(' ');
        }
        self.pending_break = false;
        self.pending_space = false;
    }

    fn line_break(&mut self) {
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.pending_space = false;
    }
}

fn html_to_text(source: &str) -> Result<Extracted, NoText> {
    let mut body = TextSink::default();
    let mut main = TextSink::default();
    let mut title = String::new();
    // The first heading inside `<main>` names the page best; `<title>` often carries the
    // site's name too, and headings outside `<main>` are the site's.
    let (mut main_h1, mut other_h1) = (String::new(), String::new());
    let (mut in_title, mut in_h1) = (false, None::<bool>);
    let mut skip_depth: Vec<String> = Vec::new();
    let (mut main_depth, mut pre_depth) = (0usize, 0usize);
    let mut rest = source;
    while !rest.is_empty() {
        let Some(open) = rest.find('<') else {
            emit_text(
                rest,
                &mut body,
                &mut main,
                main_depth,
                pre_depth,
                &skip_depth,
            );
            break;
        };
        let text = &rest[..open];
        let decoded = decode_entities(text);
        if in_title {
            title.push_str(&decoded);
        }
        match in_h1 {
            Some(true) => main_h1.push_str(&decoded),
            Some(false) => other_h1.push_str(&decoded),
            None => {}
        }
        emit_text(
            text,
            &mut body,
            &mut main,
            main_depth,
            pre_depth,
            &skip_depth,
        );
        rest = &rest[open..];
        // Comments, doctypes, CDATA and processing instructions.
        if let Some(after) = rest.strip_prefix("<!--") {
            rest = after.find("-->").map_or("", |end| &after[end + 3..]);
            continue;
        }
        if rest.starts_with("<!") || rest.starts_with("<?") {
            rest = rest.find('>').map_or("", |end| &rest[end + 1..]);
            continue;
        }
        let Some(tag) = parse_tag(rest) else {
            // A lone `<` in text.
            emit_text(
                "<",
                &mut body,
                &mut main,
                main_depth,
                pre_depth,
                &skip_depth,
            );
            rest = &rest[1..];
            continue;
        };
        rest = &rest[tag.length..];
        let name = tag.name.as_str();
        if name == "meta"
            && tag
                .attribute("name")
                .is_some_and(|n| n.eq_ignore_ascii_case("robots"))
            && tag
                .attribute("content")
                .is_some_and(|c| c.to_ascii_lowercase().contains("noindex"))
        {
            return Err(NoText::NoIndex);
        }
        if name == "meta"
            && tag
                .attribute("http-equiv")
                .is_some_and(|v| v.eq_ignore_ascii_case("refresh"))
            && tag
                .attribute("content")
                .is_some_and(|c| c.to_ascii_lowercase().contains("url="))
        {
            return Err(NoText::Redirect);
        }
        match (name, tag.closing) {
            ("title", closing) => in_title = !closing && title.is_empty(),
            ("h1", false) if skip_depth.is_empty() => {
                let in_main = main_depth > 0;
                let first = if in_main { &main_h1 } else { &other_h1 };
                if first.trim().is_empty() {
                    in_h1 = Some(in_main);
                }
            }
            ("h1", true) => in_h1 = None,
            _ => {}
        }
        // The contents of skipped elements are dropped whole: `<script>` and `<style>` hold
        // raw text that may contain `<`, so jump straight to their end tag.
        if matches!(name, "script" | "style") && !tag.closing && !tag.self_closing {
            let end = format!("</{name}");
            rest = find_ignore_case(rest, &end)
                .map_or("", |at| &rest[at..])
                .split_once('>')
                .map_or("", |(_, after)| after);
            continue;
        }
        // `</head>` may be omitted: the body ends the head.
        if name == "body" && !tag.closing {
            skip_depth.retain(|open| open != "head");
        }
        if SKIPPED.contains(&name) && !tag.self_closing {
            if tag.closing {
                if let Some(at) = skip_depth.iter().rposition(|open| open == name) {
                    skip_depth.truncate(at);
                }
            } else {
                skip_depth.push(name.to_string());
            }
            continue;
        }
        if name == "main" {
            main_depth = if tag.closing {
                main_depth.saturating_sub(1)
            } else {
                main_depth + 1
            };
        }
        if name == "pre" {
            pre_depth = if tag.closing {
                pre_depth.saturating_sub(1)
            } else {
                pre_depth + 1
            };
        }
        if !skip_depth.is_empty() {
            continue;
        }
        let sinks: &mut [&mut TextSink] = if main_depth > 0 || (name == "main" && tag.closing) {
            &mut [&mut body, &mut main]
        } else {
            &mut [&mut body]
        };
        for sink in sinks.iter_mut() {
            if BLOCKS.contains(&name) {
                sink.pending_break = true;
            } else if name == "br" {
                sink.line_break();
            } else if matches!(name, "td" | "th") && !tag.closing {
                sink.pending_space = true;
            }
        }
    }
    let chosen = if main.text.trim().is_empty() {
        body.text
    } else {
        main.text
    };
    let title = [main_h1, title, other_h1]
        .into_iter()
        .map(|t| t.split_whitespace().collect::<Vec<_>>().join(" "))
        .find(|t| !t.is_empty());
    Ok(Extracted {
        title,
        text: normalize_paragraphs(&chosen),
    })
}

fn emit_text(
    raw: &str,
    body: &mut TextSink,
    main: &mut TextSink,
    main_depth: usize,
    pre_depth: usize,
    skip_depth: &[String],
) {
    if raw.is_empty() || !skip_depth.is_empty() {
        return;
    }
    let text = decode_entities(raw);
    body.push_text(&text, pre_depth > 0);
    if main_depth > 0 {
        main.push_text(&text, pre_depth > 0);
    }
}

fn find_ignore_case(haystack: &str, needle: &str) -> Option<usize> {
    haystack
        .as_bytes()
        .windows(needle.len())
        .position(|window| window.eq_ignore_ascii_case(needle.as_bytes()))
}

/// A start or end tag.
struct Tag<'a> {
    name: String,
    closing: bool,
    self_closing: bool,
    attributes: &'a str,
    /// Bytes up to and including `>`.
    length: usize,
}

impl Tag<'_> {
    /// The value of attribute `wanted` (quoted or not).
    fn attribute(&self, wanted: &str) -> Option<String> {
        let mut rest = self.attributes;
        loop {
            rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '/');
            if rest.is_empty() {
                return None;
            }
            let name_end = rest
                .find(|c: char| c.is_whitespace() || c == '=' || c == '/')
                .unwrap_or(rest.len());
            let name = &rest[..name_end];
            rest = rest[name_end..].trim_start();
            let value = if let Some(after) = rest.strip_prefix('=') {
                let after = after.trim_start();
                let (value, next) = match after.chars().next() {
                    Some(quote @ ('"' | '\'')) => {
                        let inner = &after[1..];
                        let end = inner.find(quote).unwrap_or(inner.len());
                        (&inner[..end], inner.get(end + 1..).unwrap_or(""))
                    }
                    _ => {
                        let end = after.find(char::is_whitespace).unwrap_or(after.len());
                        (&after[..end], &after[end..])
                    }
                };
                rest = next;
                value
            } else {
                ""
            };
            if name.eq_ignore_ascii_case(wanted) {
                return Some(decode_entities(value));
            }
        }
    }
}

/// The tag at the start of `source` (which starts with `<`), or `None` when the `<` does not
/// open one.
fn parse_tag(source: &str) -> Option<Tag<'_>> {
    let inner = &source[1..];
    let (closing, inner) = match inner.strip_prefix('/') {
        Some(rest) => (true, rest),
        None => (false, inner),
    };
    if !inner.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let name_end = inner
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == ':'))
        .unwrap_or(inner.len());
    // The closing `>`, outside quoted attribute values.
    let mut quote = None;
    let mut end = None;
    for (i, c) in inner[name_end..].char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '>') => {
                end = Some(name_end + i);
                break;
            }
            _ => {}
        }
    }
    let end = end?;
    let attributes = &inner[name_end..end];
    Some(Tag {
        name: inner[..name_end].to_ascii_lowercase(),
        closing,
        self_closing: attributes.trim_end().ends_with('/'),
        attributes,
        length: 1 + usize::from(closing) + end + 1,
    })
}

/// Decodes numeric character references and the named ones that occur in practice.
fn decode_entities(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        // A numeric reference takes only its digits (`&#8217s` is `’s`); a named one its
        // letters and digits.
        let hex = rest[1..].starts_with("#x") || rest[1..].starts_with("#X");
        let (digits_start, is_digit): (usize, fn(&char) -> bool) = if hex {
            (3, char::is_ascii_hexdigit)
        } else if rest[1..].starts_with('#') {
            (2, char::is_ascii_digit)
        } else {
            (1, char::is_ascii_alphanumeric)
        };
        let end = digits_start + rest[digits_start..].chars().take_while(is_digit).count();
        let name = &rest[1..end];
        let decoded = if digits_start > 1 {
            let digits = &rest[digits_start..end];
            let code = if hex {
                u32::from_str_radix(digits, 16).ok()
            } else {
                digits.parse().ok()
            };
            // NUL and surrogates become U+FFFD, as browsers read them.
            code.map(|c| match c {
                0 => '\u{fffd}',
                c => char::from_u32(c).unwrap_or('\u{fffd}'),
            })
        } else {
            named_entity(name)
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end..];
                rest = rest.strip_prefix(';').unwrap_or(rest);
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn named_entity(name: &str) -> Option<char> {
    Some(match name {
        "amp" => '&',
        "lt" => '<',
        "gt" => '>',
        "quot" => '"',
        "apos" => '\'',
        "nbsp" => '\u{a0}',
        "ndash" => '–',
        "mdash" => '—',
        "hellip" => '…',
        "lsquo" => '‘',
        "rsquo" => '’',
        "ldquo" => '“',
        "rdquo" => '”',
        "laquo" => '«',
        "raquo" => '»',
        "copy" => '©',
        "reg" => '®',
        "trade" => '™',
        "times" => '×',
        "middot" => '·',
        "bull" => '•',
        "deg" => '°',
        "eacute" => 'é',
        "egrave" => 'è',
        "agrave" => 'à',
        "uuml" => 'ü',
        "ouml" => 'ö',
        "auml" => 'ä',
        "szlig" => 'ß',
        "ccedil" => 'ç',
        "euro" => '€',
        "rarr" => '→',
        "larr" => '←',
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_keeps_main_and_drops_navigation_and_scripts() {
        let page = r#"<!DOCTYPE html><html><head><title>What is Ownership? - Book</title>
            <script>if (a < b) { document.write("<p>no</p>"); }</script></head>
            <body><h1>Site</h1><nav><a href="x">Chapter 1</a></nav>
            <main><h1 id="o">What Is <em>Ownership</em>?</h1>
            <p>Ownership is a set&nbsp;of rules &amp; checks.</p><!-- hidden -->
            <pre><code>let s = String::from("hi");
let t = s;</code></pre><p>Caf&eacute; &#x263A; &#169;</p></main>
            <footer>Footer text</footer></body></html>"#;
        let doc = extract(page.as_bytes(), Format::Html).unwrap();
        assert_eq!(doc.title.as_deref(), Some("What Is Ownership?"));
        assert_eq!(
            doc.text,
            "What Is Ownership?\n\nOwnership is a set of rules & checks.\n\n\
             let s = String::from(\"hi\");\nlet t = s;\n\nCafé ☺ ©"
        );
    }

    #[test]
    fn html_without_main_uses_the_body_and_title() {
        let page = "<html><head><title> A  page </title><style>p{}</style></head>\
                    <body><div>One<br>two</div><p>3 < 4</p></body></html>";
        let doc = extract(page.as_bytes(), Format::Html).unwrap();
        assert_eq!(doc.title.as_deref(), Some("A page"));
        assert_eq!(doc.text, "One\ntwo\n\n3 < 4");
    }

    #[test]
    fn noindex_binary_and_empty_documents_are_refused() {
        let page = r#"<html><head><meta name="robots" content="noindex"></head><body>x</body>"#;
        assert_eq!(extract(page.as_bytes(), Format::Html), Err(NoText::NoIndex));
        let page = r#"<head><META HTTP-EQUIV="Refresh" content="0; URL=ch19.html"></head>"#;
        assert_eq!(
            extract(page.as_bytes(), Format::Html),
            Err(NoText::Redirect)
        );
        assert_eq!(extract(b"ab\0cd", Format::Text), Err(NoText::Binary));
        assert_eq!(
            extract(&[0xff, 0xfe, 0x41], Format::Text),
            Err(NoText::Binary)
        );
        assert_eq!(extract(b" \n\n ", Format::Markdown), Err(NoText::Empty));
        assert_eq!(
            extract(b"<html><body><script>x</script></body>", Format::Html),
            Err(NoText::Empty)
        );
    }

    #[test]
    fn markdown_title_and_paragraphs() {
        let doc = extract(
            b"Intro\n=====\n\nFirst  line\r\nsecond\n\n\n\n# Next\n",
            Format::Markdown,
        )
        .unwrap();
        assert_eq!(doc.title.as_deref(), Some("Intro"));
        assert_eq!(doc.text, "Intro\n=====\n\nFirst  line\nsecond\n\n# Next");
        let doc = extract(b"text\n## Heading ##\n", Format::Markdown).unwrap();
        assert_eq!(doc.title.as_deref(), Some("Heading"));
        let markdown = b"```c\n#include <a.h>\n```\n#hashtag\n### Real\n";
        let doc = extract(markdown, Format::Markdown).unwrap();
        assert_eq!(doc.title.as_deref(), Some("Real"));
    }

    #[test]
    fn omitted_head_end_auto_refresh_and_references() {
        let page = "<html><head><title>T</title><body><p>caf\u{e9} &#8217s &#0; &#x41;&#65 &amp &bogus;</p>";
        let doc = extract(page.as_bytes(), Format::Html).unwrap();
        assert_eq!(doc.title.as_deref(), Some("T"));
        assert_eq!(doc.text, "caf\u{e9} \u{2019}s \u{fffd} AA & &bogus;");
        let page = r#"<head><meta http-equiv="refresh" content="300"></head><body>Live</body>"#;
        assert_eq!(extract(page.as_bytes(), Format::Html).unwrap().text, "Live");
    }

    #[test]
    fn malformed_markup_does_not_panic() {
        for page in [
            "<",
            "<p",
            "<a href='x>text",
            "&#xZZ; &",
            "&#",
            "&#x",
            "&#99999999999;",
            "<p>é<b>ü</b>&é</p>",
            "<main><pre>",
            "</main></main>",
        ] {
            let _ = extract(page.as_bytes(), Format::Html);
        }
    }
}
