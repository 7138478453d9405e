//! Analysis patterns are data: which stages run, and the prompt templates of the
//! `meta` and `synthesis` stages. Built in, and overridable or extendable from the
//! configuration file (`[patterns.<name>]`, read by `common::settings`). Templates use
//! `$original_prompt`, `$own_response` and `$other_responses` (meta) and `$responses`
//! (synthesis).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::domain::Stage;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternSpec {
    #[serde(default)]
    pub description: String,
    /// Each model revises its answer in view of the others'; absent: one stage only.
    #[serde(default)]
    pub meta_template: Option<String>,
    /// One model writes the final answer from the others'; absent: no synthesis.
    #[serde(default)]
    pub synthesis_template: Option<String>,
}

impl PatternSpec {
    pub fn stages(&self) -> Vec<Stage> {
        let mut stages = vec![Stage::Initial];
        if self.meta_template.is_some() {
            stages.push(Stage::Meta);
        }
        if self.synthesis_template.is_some() {
            stages.push(Stage::Synthesis);
        }
        stages
    }

    /// The most tokens a job on `models` models can use, to reserve against the
    /// budget: every call reads the prompt and writes at most `max_tokens`; a meta
    /// call also reads its template and every model's answer (its own and the
    /// others'), and so does the synthesis. Prompt and template are estimated at four
    /// characters a token.
    pub fn worst_case_tokens(&self, models: u64, prompt_tokens: u64, max_tokens: u64) -> u64 {
        let answers = models.saturating_mul(max_tokens);
        let reading_answers = |template: &str| {
            let template_tokens = estimate_tokens(template);
            prompt_tokens.saturating_add(template_tokens).saturating_add(answers).saturating_add(max_tokens)
        };
        let initial = models.saturating_mul(prompt_tokens.saturating_add(max_tokens));
        let meta = self.meta_template.as_deref().map_or(0, |t| models.saturating_mul(reading_answers(t)));
        let synthesis = self.synthesis_template.as_deref().map_or(0, reading_answers);
        initial.saturating_add(meta).saturating_add(synthesis)
    }
}

/// Characters a token, the usual rule of thumb for English text: budgets, the
/// context-window check and usage a provider does not report all estimate with it.
pub const CHARS_PER_TOKEN: usize = 4;

/// Tokens in `chars` characters, estimated.
pub fn tokens_in_chars(chars: usize) -> u64 {
    chars.div_ceil(CHARS_PER_TOKEN) as u64
}

/// Tokens in a text, estimated.
pub fn estimate_tokens(text: &str) -> u64 {
    tokens_in_chars(text.chars().count())
}

/// A rendered prompt would be longer than the model can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the rendered prompt would be {chars} characters, over the limit of {limit}")]
pub struct PromptTooLong {
    pub chars: usize,
    pub limit: usize,
}

/// Fills a template in one pass over the template alone: the values (a user's
/// prompt, the models' answers) are copied in as they are and never scanned for
/// `$names`, so text that contains `$other_responses` cannot multiply itself.
/// Unknown `$names` are left as written. The size is counted before anything is
/// built, so a prompt over `max_chars` costs no memory.
pub fn render<'a>(template: &'a str, values: &[(&str, &'a str)], max_chars: usize) -> Result<String, PromptTooLong> {
    let pieces = pieces(template, values);
    let chars = pieces.iter().map(|piece| piece.chars().count()).sum();
    if chars > max_chars {
        return Err(PromptTooLong { chars, limit: max_chars });
    }
    Ok(pieces.concat())
}

/// The template cut at its placeholders, each placeholder replaced by its value.
fn pieces<'a>(template: &'a str, values: &[(&str, &'a str)]) -> Vec<&'a str> {
    let mut pieces = Vec::new();
    let mut rest = template;
    while let Some(at) = rest.find('$') {
        pieces.push(&rest[..at]);
        let after = &rest[at + 1..];
        // The longest name that matches, so `$own_response` is not taken for a shorter one.
        let found = values.iter().filter(|(name, _)| after.starts_with(name)).max_by_key(|(name, _)| name.len());
        match found {
            Some((name, value)) => {
                pieces.push(value);
                rest = &after[name.len()..];
            }
            None => {
                pieces.push("$");
                rest = after;
            }
        }
    }
    pieces.push(rest);
    pieces
}

const META_INTRO: &str = "Original question:\n$original_prompt\n\nYour earlier answer:\n$own_response\n\nOther models answered:\n$other_responses\n\n";
const SYNTHESIS_INTRO: &str = "Original question:\n$original_prompt\n\nThe models' answers:\n$responses\n\n";

#[derive(Debug, Clone)]
pub struct Patterns(BTreeMap<String, PatternSpec>);

/// The patterns' part of the configuration file; its other tables are ignored here.
#[derive(Debug, Default, Deserialize)]
pub struct PatternsFile {
    #[serde(default)]
    pub patterns: BTreeMap<String, PatternSpec>,
}

impl Patterns {
    pub fn builtin() -> Self {
        let multi = |description: &str, meta: &str, synthesis: &str| PatternSpec {
            description: description.to_owned(),
            meta_template: Some(format!("{META_INTRO}{meta}")),
            synthesis_template: Some(format!("{SYNTHESIS_INTRO}{synthesis}")),
        };
        Self(BTreeMap::from([
            (
                "direct".to_owned(),
                PatternSpec {
                    description: "Every model answers the prompt once.".to_owned(),
                    meta_template: None,
                    synthesis_template: None,
                },
            ),
            ("gut".to_owned(), multi(
                "Quick reactions, revised once, combined.",
                "Give your revised answer in a few sentences, trusting your first instinct where the others disagree.",
                "Write the answer most of them would stand behind, briefly.",
            )),
            ("confidence".to_owned(), multi(
                "Answers with stated confidence, reconciled by confidence.",
                "Revise your answer and state your confidence (0-100%) in each claim.",
                "Combine the answers, weighing each claim by the confidence given and noting where confidence was low.",
            )),
            ("critique".to_owned(), multi(
                "Each model critiques the others, then a synthesis.",
                "Critique the other answers: what is wrong, missing or weak? Then give your improved answer.",
                "Write the best final answer, using the critiques to avoid the mistakes they found.",
            )),
            ("fact_check".to_owned(), multi(
                "Claims are checked against each other before a final answer.",
                "List the factual claims in all answers, mark each as supported, doubtful or wrong, and correct your answer.",
                "Write the final answer using only the claims that survived the checks; say what remains uncertain.",
            )),
            ("perspective".to_owned(), multi(
                "Different viewpoints are compared and kept distinct.",
                "Which perspectives do the other answers take that yours does not? Revise your answer to name your perspective.",
                "Present the main perspectives side by side, then what they agree on.",
            )),
            ("scenario".to_owned(), multi(
                "Possible outcomes explored and weighed.",
                "Add the scenarios the others missed and estimate how likely each is.",
                "Lay out the scenarios from most to least likely, with what would signal each.",
            )),
        ]))
    }

    /// The built-in patterns, with those the file defines replaced or added.
    pub fn from_file(file: PatternsFile) -> Self {
        let mut patterns = Self::builtin();
        patterns.0.extend(file.patterns);
        patterns
    }

    pub fn get(&self, name: &str) -> Option<&PatternSpec> {
        self.0.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &PatternSpec)> {
        self.0.iter().map(|(name, spec)| (name.as_str(), spec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_their_placeholders() {
        let out = render(
            "Q: $original_prompt / mine: $own_response / theirs: $other_responses / $unknown costs $5",
            &[("original_prompt", "why?"), ("own_response", "because"), ("other_responses", "- beta: since")],
            1_000,
        );
        assert_eq!(out.as_deref(), Ok("Q: why? / mine: because / theirs: - beta: since / $unknown costs $5"));
    }

    #[test]
    fn placeholders_in_user_text_are_not_expanded() {
        let hostile = "$other_responses ".repeat(1_900);
        let out = render(
            "Q: $original_prompt\nOthers: $other_responses",
            &[("original_prompt", &hostile), ("other_responses", "- beta: a long answer")],
            1_000_000,
        )
        .expect("fits");
        assert_eq!(out.matches("- beta: a long answer").count(), 1);
        assert_eq!(out.matches("$other_responses").count(), 1_900);
    }

    #[test]
    fn a_prompt_over_the_limit_is_refused_before_it_is_built() {
        let answer = "x".repeat(600);
        let out = render("$original_prompt $responses", &[("original_prompt", "q"), ("responses", &answer)], 500);
        assert_eq!(out, Err(PromptTooLong { chars: 602, limit: 500 }));
    }

    #[test]
    fn builtin_patterns_and_their_calls() {
        let patterns = Patterns::builtin();
        for name in ["direct", "gut", "confidence", "critique", "fact_check", "perspective", "scenario"] {
            assert!(patterns.get(name).is_some(), "{name}");
        }
        assert_eq!(
            patterns.get("critique").map(PatternSpec::stages),
            Some(vec![Stage::Initial, Stage::Meta, Stage::Synthesis])
        );
    }

    #[test]
    fn the_worst_case_covers_what_meta_and_synthesis_read() {
        let patterns = Patterns::builtin();
        let direct = patterns.get("direct").expect("built in");
        // Three calls, each reading 10 prompt tokens and writing up to 100.
        assert_eq!(direct.worst_case_tokens(3, 10, 100), 330);
        let critique = patterns.get("critique").expect("built in");
        let meta_template = estimate_tokens(critique.meta_template.as_deref().unwrap_or_default());
        let synthesis_template = estimate_tokens(critique.synthesis_template.as_deref().unwrap_or_default());
        // Each meta call and the synthesis read the prompt, their template and all
        // three answers (300), and write up to 100.
        let expected = 330 + 3 * (10 + meta_template + 300 + 100) + (10 + synthesis_template + 300 + 100);
        assert_eq!(critique.worst_case_tokens(3, 10, 100), expected);
    }
}
