//! Text to token ids and back: an HF `tokenizer.json` when the model folder has one, else the
//! GPT-2 BPE (tiktoken's r50k_base, embedded, offline) for GPT-2-family models.

use anyhow::{anyhow, bail, Result};
use std::path::Path;

pub enum Tokenizer {
    Hf(Box<tokenizers::Tokenizer>),
    Gpt2(tiktoken_rs::CoreBPE),
}

impl Tokenizer {
    pub fn for_model(dir: &Path, family: &str) -> Result<Self> {
        let file = dir.join("tokenizer.json");
        if file.exists() {
            let bytes = scalpel_files::read_regular(&file)?;
            let t = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| anyhow!("{} could not be read: {e}", file.display()))?;
            return Ok(Tokenizer::Hf(Box::new(t)));
        }
        if family == "gpt2" {
            return Ok(Tokenizer::Gpt2(tiktoken_rs::r50k_base()?));
        }
        bail!("{} has no tokenizer.json, and only GPT-2 models have a built-in tokenizer", dir.display())
    }

    pub fn name(&self) -> &'static str {
        match self {
            Tokenizer::Hf(_) => "tokenizer.json",
            Tokenizer::Gpt2(_) => "GPT-2 BPE (r50k_base, built in)",
        }
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        Ok(match self {
            Tokenizer::Hf(t) => t.encode_fast(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().iter().map(|&i| i as i64).collect(),
            Tokenizer::Gpt2(t) => t.encode_ordinary(text).into_iter().map(|i| i as i64).collect(),
        })
    }

    /// Token ids of a prompt, with the special tokens the tokenizer adds itself (Gemma's BOS): what
    /// transformers' `tokenizer(prompt)` gives.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<i64>> {
        Ok(match self {
            Tokenizer::Hf(t) => t.encode(text, true).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().iter().map(|&i| i as i64).collect(),
            Tokenizer::Gpt2(_) => self.encode(text)?,
        })
    }

    /// Text of `ids`; bytes that do not form UTF-8 (a character split across tokens, as a generation cut at
    /// --max-tokens or a sampled byte token leaves) become U+FFFD, as transformers decodes them.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        match self {
            Tokenizer::Hf(t) => {
                let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
                t.decode(&ids, false).map_err(|e| anyhow!("detokenizing: {e}"))
            }
            Tokenizer::Gpt2(t) => Ok(String::from_utf8_lossy(&t.decode_bytes(&ids.iter().map(|&i| i as u32).collect::<Vec<_>>())?).into_owned()),
        }
    }

    /// The end-of-sequence token: `eos_token` of the folder's tokenizer_config.json, else a
    /// conventional one the vocabulary has.
    pub fn eos(&self, dir: &Path) -> Option<i64> {
        let Tokenizer::Hf(t) = self else { return Some(50256) };
        let config = scalpel_files::read_regular_string(&dir.join("tokenizer_config.json")).ok().and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
        let named = config.as_ref().and_then(|c| c["eos_token"].as_str().or(c["eos_token"]["content"].as_str()).map(String::from));
        named
            .into_iter()
            .chain(["<|endoftext|>", "</s>", "<|end_of_text|>", "<|im_end|>"].map(String::from))
            .find_map(|s| t.token_to_id(&s))
            .map(|i| i as i64)
    }

    /// The beginning-of-sequence token, if the tokenizer has one: the special token its template puts
    /// first (what it adds itself, Gemma's `<bos>`), else a conventional one the vocabulary has.
    pub fn bos(&self) -> Option<i64> {
        match self {
            Tokenizer::Hf(t) => template_first(t)
                .into_iter()
                .chain(["<|endoftext|>", "<s>", "<|begin_of_text|>", "<|im_start|>"].map(String::from))
                .find_map(|s| t.token_to_id(&s))
                .map(|i| i as i64),
            Tokenizer::Gpt2(_) => Some(50256),
        }
    }
}

/// The special token a tokenizer's post-processing template puts before a single sequence, if any.
fn template_first(t: &tokenizers::Tokenizer) -> Option<String> {
    let post = serde_json::to_value(t.get_post_processor()?).ok()?;
    let templates = match post["type"].as_str()? {
        "TemplateProcessing" => vec![post],
        "Sequence" => post["processors"].as_array()?.iter().filter(|p| p["type"] == "TemplateProcessing").cloned().collect(),
        _ => return None,
    };
    templates.iter().find_map(|p| p["single"][0]["SpecialToken"]["id"].as_str().map(String::from))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_built_in_gpt2_tokenizer_matches_openais_ids() {
        let t = super::Tokenizer::Gpt2(tiktoken_rs::r50k_base().unwrap());
        let ids = t.encode("Hello world, this is GPT-2.").unwrap();
        assert_eq!(ids, vec![15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]);
        assert_eq!(t.decode(&ids).unwrap(), "Hello world, this is GPT-2.");
    }

    #[test]
    fn a_character_split_across_tokens_decodes_with_a_replacement_mark() {
        // The first byte of "é" alone is no UTF-8: a generation cut there once failed with "Unable to decode".
        let bpe = tiktoken_rs::r50k_base().unwrap();
        let half = (0..256).find(|&i| bpe.decode_bytes(&[i]).unwrap() == [0xC3]).unwrap() as i64;
        let t = super::Tokenizer::Gpt2(bpe);
        let mut ids = t.encode("caf").unwrap();
        ids.push(half);
        assert_eq!(t.decode(&ids).unwrap(), "caf\u{FFFD}");
    }
}
