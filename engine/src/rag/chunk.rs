//! Splitting a document into overlapping chunks of at most `max_tokens` tokens, cut at
//! paragraph boundaries where that keeps chunks reasonably full, else at sentence
//! boundaries, and inside a sentence (between words) only when a sentence alone is too long.

use std::ops::Range;

use unicode_segmentation::UnicodeSegmentation;

use crate::error::{Error, Result};

/// How documents are cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkOptions {
    /// The most tokens in a chunk.
    pub max_tokens: usize,
    /// Tokens of whole sentences that consecutive chunks share.
    pub overlap_tokens: usize,
}

impl Default for ChunkOptions {
    /// 200-token chunks sharing up to 32 tokens: they fit, with a title, in the 256
    /// tokens all-MiniLM-L6-v2 reads.
    fn default() -> Self {
        Self {
            max_tokens: 200,
            overlap_tokens: 32,
        }
    }
}

impl ChunkOptions {
    fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 {
            return Err(Error::InvalidArgument(
                "chunks need at least one token".into(),
            ));
        }
        if self.overlap_tokens * 2 >= self.max_tokens && self.overlap_tokens > 0 {
            return Err(Error::InvalidArgument(format!(
                "chunk overlap {} is not less than half of the chunk size {}",
                self.overlap_tokens, self.max_tokens
            )));
        }
        Ok(())
    }
}

/// A piece no chunk boundary falls inside: a sentence, or a run of words of a sentence too
/// long for one chunk.
#[derive(Debug, Clone)]
struct Unit {
    range: Range<usize>,
    tokens: usize,
    paragraph: usize,
}

/// Cuts `text` (paragraphs separated by blank lines) into chunks; `count_tokens` counts the
/// tokens of a piece of text as the embedder will read it (without special tokens).
pub fn chunk_text(
    text: &str,
    options: ChunkOptions,
    count_tokens: &dyn Fn(&str) -> Result<usize>,
) -> Result<Vec<String>> {
    options.validate()?;
    let units = units(text, options.max_tokens, count_tokens)?;
    let mut chunks: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_tokens = 0;
    for (index, unit) in units.iter().enumerate() {
        if current_tokens + unit.tokens > options.max_tokens && !current.is_empty() {
            // Where the next unit starts a paragraph, the chunk ends at one. Else cut at the
            // last paragraph start when what comes before it fills half a chunk (and what
            // comes after it fits with the next unit): those sentences move to the next chunk.
            let last = current[current.len() - 1];
            let cut = if unit.paragraph != units[last].paragraph {
                current.len()
            } else {
                current
                    .iter()
                    .rposition(|&u| u != current[0] && units[u].paragraph != units[u - 1].paragraph)
                    .filter(|&at| {
                        let tokens =
                            |part: &[usize]| part.iter().map(|&u| units[u].tokens).sum::<usize>();
                        tokens(&current[..at]) * 2 >= options.max_tokens
                            && tokens(&current[at..]) + unit.tokens <= options.max_tokens
                    })
                    .unwrap_or(current.len())
            };
            let carried = current.split_off(cut);
            // Consecutive chunks share whole trailing sentences of up to `overlap_tokens`.
            let mut overlap = Vec::new();
            let mut overlap_tokens = 0;
            for &u in current.iter().rev() {
                if overlap_tokens + units[u].tokens > options.overlap_tokens {
                    break;
                }
                overlap_tokens += units[u].tokens;
                overlap.insert(0, u);
            }
            chunks.push(std::mem::take(&mut current));
            current = overlap;
            current.extend(carried);
            current_tokens = current.iter().map(|&u| units[u].tokens).sum();
            // The shared sentences give way when they leave no room for the next unit (the
            // carried ones always leave room).
            while current_tokens + unit.tokens > options.max_tokens && !current.is_empty() {
                current_tokens -= units[current.remove(0)].tokens;
            }
        }
        current.push(index);
        current_tokens += unit.tokens;
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    Ok(chunks
        .iter()
        .map(|chunk| render(text, &units, chunk))
        .collect())
}

/// The text of a chunk: the source between its units, with paragraphs separated by a blank
/// line and the original spacing (code lines) inside each paragraph.
fn render(text: &str, units: &[Unit], chunk: &[usize]) -> String {
    let mut out = String::new();
    let mut start = units[chunk[0]].range.start;
    for (i, &u) in chunk.iter().enumerate() {
        let next = chunk.get(i + 1).map(|&n| &units[n]);
        // Chunks are runs of consecutive units.
        if next.is_none_or(|n| n.paragraph != units[u].paragraph) {
            if !out.is_empty() {
                out.push_str("\n\n");
            }
            out.push_str(text[start..units[u].range.end].trim());
            if let Some(n) = next {
                start = n.range.start;
            }
        }
    }
    out
}

/// Paragraphs → sentences → (for sentences longer than `max_tokens`) runs of words.
fn units(
    text: &str,
    max_tokens: usize,
    count_tokens: &dyn Fn(&str) -> Result<usize>,
) -> Result<Vec<Unit>> {
    let mut units = Vec::new();
    for (paragraph, range) in paragraphs(text).into_iter().enumerate() {
        let mut offset = range.start;
        for sentence in text[range.clone()].split_sentence_bounds() {
            let start = offset;
            offset += sentence.len();
            if sentence.trim().is_empty() {
                continue;
            }
            let tokens = count_tokens(sentence)?;
            if tokens <= max_tokens {
                units.push(Unit {
                    range: start..offset,
                    tokens,
                    paragraph,
                });
                continue;
            }
            split_words(
                text,
                start..offset,
                max_tokens,
                paragraph,
                count_tokens,
                &mut units,
            )?;
        }
    }
    Ok(units)
}

/// Byte ranges of the paragraphs: text separated by blank lines.
fn paragraphs(text: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let blank = line.trim().is_empty();
        match (start, blank) {
            (None, false) => start = Some(offset),
            (Some(s), true) => {
                out.push(s..offset);
                start = None;
            }
            _ => {}
        }
        offset += line.len();
    }
    if let Some(s) = start {
        out.push(s..text.len());
    }
    out
}

/// Runs of whole words of at most `max_tokens` tokens (a single word longer than that is cut
/// between characters).
fn split_words(
    text: &str,
    range: Range<usize>,
    max_tokens: usize,
    paragraph: usize,
    count_tokens: &dyn Fn(&str) -> Result<usize>,
    units: &mut Vec<Unit>,
) -> Result<()> {
    let mut run_start = None;
    let mut run_end = range.start;
    let mut run_tokens = 0;
    for (at, word) in text[range.clone()].split_word_bound_indices() {
        let start = range.start + at;
        let tokens = if word.trim().is_empty() {
            0
        } else {
            count_tokens(word)?
        };
        if tokens > max_tokens {
            // One enormous "word" (a URL, a base64 blob): cut it by characters.
            if let Some(s) = run_start.take() {
                units.push(Unit {
                    range: s..run_end,
                    tokens: run_tokens,
                    paragraph,
                });
            }
            run_tokens = 0;
            let mut piece_start = start;
            for (offset, c) in word.char_indices() {
                let end = start + offset + c.len_utf8();
                let piece_tokens = count_tokens(&text[piece_start..end])?;
                if piece_tokens > max_tokens {
                    let cut = start + offset;
                    if cut > piece_start {
                        let tokens = count_tokens(&text[piece_start..cut])?;
                        units.push(Unit {
                            range: piece_start..cut,
                            tokens,
                            paragraph,
                        });
                        piece_start = cut;
                    }
                }
            }
            let tokens = count_tokens(&text[piece_start..start + word.len()])?;
            units.push(Unit {
                range: piece_start..start + word.len(),
                tokens,
                paragraph,
            });
            run_end = start + word.len();
            continue;
        }
        if run_tokens + tokens > max_tokens
            && let Some(s) = run_start.take()
        {
            units.push(Unit {
                range: s..run_end,
                tokens: run_tokens,
                paragraph,
            });
            run_tokens = 0;
        }
        if run_start.is_none() && tokens == 0 {
            continue;
        }
        run_start.get_or_insert(start);
        run_tokens += tokens;
        run_end = start + word.len();
    }
    if let Some(s) = run_start {
        units.push(Unit {
            range: s..run_end,
            tokens: run_tokens,
            paragraph,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per word, as a stand-in for a real tokenizer.
    fn words(text: &str) -> Result<usize> {
        Ok(text.unicode_words().count())
    }

    fn chunks(text: &str, max_tokens: usize, overlap_tokens: usize) -> Vec<String> {
        let options = ChunkOptions {
            max_tokens,
            overlap_tokens,
        };
        chunk_text(text, options, &words).unwrap()
    }

    #[test]
    fn short_text_is_one_chunk() {
        assert_eq!(
            chunks("One two. Three four.", 10, 2),
            ["One two. Three four."]
        );
        assert!(chunks("  \n\n ", 10, 2).is_empty());
    }

    #[test]
    fn cuts_at_paragraphs_when_the_chunk_is_half_full() {
        let text = "A b c. D e f.\n\nG h i. J k l.\n\nM n o.";
        // 6 + 6 words fill a 12-word chunk; the third paragraph starts the next.
        assert_eq!(
            chunks(text, 12, 0),
            ["A b c. D e f.\n\nG h i. J k l.", "M n o."]
        );
        // 10 words: "J k l." would end the first chunk mid-paragraph.
        assert_eq!(
            chunks(text, 10, 0),
            ["A b c. D e f.", "G h i. J k l.\n\nM n o."]
        );
        // 9-word chunks: after "A b c. D e f." (6 ≥ 9/2) the cut moves to the paragraph.
        assert_eq!(
            chunks(text, 9, 0),
            ["A b c. D e f.", "G h i. J k l.\n\nM n o."]
        );
    }

    #[test]
    fn overlapping_sentences_are_shared() {
        let text = "S1 a. S2 b. S3 c. S4 d. S5 e.";
        let out = chunks(text, 6, 2);
        assert_eq!(out, ["S1 a. S2 b. S3 c.", "S3 c. S4 d. S5 e."]);
        for chunk in &out {
            assert!(words(chunk).unwrap() <= 6);
        }
    }

    #[test]
    fn long_sentences_are_cut_between_words_and_code_keeps_its_lines() {
        let sentence = (0..25)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let out = chunks(&sentence, 10, 0);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|c| words(c).unwrap() <= 10));
        assert_eq!(out.join(" "), sentence);
        let code = "fn main() {\n    let s = 1;\n}";
        assert_eq!(chunks(code, 50, 0), [code]);
        let blob = "x".repeat(100);
        let out = chunk_text(
            &blob,
            ChunkOptions {
                max_tokens: 4,
                overlap_tokens: 0,
            },
            &|t: &str| Ok(t.len().div_ceil(10)),
        )
        .unwrap();
        assert_eq!(out.concat(), blob);
        assert!(out.iter().all(|c| c.len() <= 40));
    }

    #[test]
    fn every_chunk_fits_and_all_text_is_covered() {
        let text = "Ownership is a set of rules. It governs memory!\n\n\
                    Some languages have garbage collection; others free memory explicitly. \
                    Rust uses a third approach? Yes.\n\nThe end.";
        for max in [4, 6, 9, 15, 40] {
            let out = chunks(text, max, max / 3);
            for chunk in &out {
                assert!(words(chunk).unwrap() <= max, "{chunk:?} over {max}");
            }
            for word in text.unicode_words() {
                assert!(out.iter().any(|c| c.contains(word)), "{word} lost at {max}");
            }
        }
    }

    #[test]
    fn bad_options_are_refused() {
        let options = ChunkOptions {
            max_tokens: 10,
            overlap_tokens: 6,
        };
        assert!(chunk_text("a", options, &words).is_err());
        let options = ChunkOptions {
            max_tokens: 0,
            overlap_tokens: 0,
        };
        assert!(chunk_text("a", options, &words).is_err());
    }
}
