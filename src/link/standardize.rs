//! Demographic standardization before comparison: case, punctuation and
//! diacritics removed, common nicknames mapped to their full name, phone and
//! SSN reduced to digits (placeholder SSNs dropped), e-mail lower-cased,
//! ZIP to five digits, street suffixes spelled one way.

use compact_str::CompactString;
use unicode_normalization::UnicodeNormalization;

/// Letters and digits only, lower-case ASCII, single spaces; diacritics
/// removed (`Zoë` → `zoe`). `None` when nothing is left.
pub fn name(raw: Option<&str>) -> Option<CompactString> {
    let raw = raw?;
    match raw.is_ascii() {
        // Nothing to decompose: folded byte by byte on the stack.
        true if raw.len() <= ASCII_ON_STACK => fold_ascii(raw.as_bytes()),
        true => fold(raw.chars(), raw.len()),
        false => fold(
            raw.nfd()
                .filter(|c| !unicode_normalization::char::is_combining_mark(*c)),
            raw.len(),
        ),
    }
}

/// The longest ASCII name [`fold_ascii`] folds (longer ones are rare).
const ASCII_ON_STACK: usize = 64;

/// [`fold`] of ASCII bytes (at most [`ASCII_ON_STACK`]), in a buffer on the
/// stack: a name is a few bytes, and pushing them one by one into a
/// `CompactString` cost more than folding them.
fn fold_ascii(raw: &[u8]) -> Option<CompactString> {
    let mut out = [0u8; ASCII_ON_STACK];
    let (mut n, mut gap) = (0, false);
    for &b in raw {
        if !b.is_ascii_alphanumeric() {
            gap = true;
            continue;
        }
        if gap && n > 0 {
            out[n] = b' ';
            n += 1;
        }
        gap = false;
        out[n] = b.to_ascii_lowercase();
        n += 1;
    }
    (n > 0).then(|| CompactString::from_utf8(&out[..n]).expect("ASCII"))
}

/// [`name`] of decomposed characters without combining marks: letters and
/// digits lower-cased, other ASCII-less letters dropped, any run of other
/// characters one space between words.
fn fold(chars: impl Iterator<Item = char>, capacity: usize) -> Option<CompactString> {
    let mut out = CompactString::with_capacity(capacity);
    let mut gap = false;
    for c in chars {
        if !c.is_alphanumeric() {
            gap = true;
            continue;
        }
        let c = c.to_ascii_lowercase();
        if !c.is_ascii() {
            continue;
        }
        if gap && !out.is_empty() {
            out.push(' ');
        }
        gap = false;
        out.push(c);
    }
    (!out.is_empty()).then_some(out)
}

/// A given name with common nicknames mapped to the full name.
pub fn given(raw: Option<&str>) -> Option<CompactString> {
    given_as_written(raw).map(|first| full_given(&first))
}

/// The full name of a nickname (`bill` → `william`), else the name itself.
pub fn full_given(first: &str) -> CompactString {
    NICKNAMES
        .iter()
        .find(|(nick, _)| *nick == first)
        .map_or(first, |(_, full)| full)
        .into()
}

/// The first word of a given name, folded as [`name`], nickname kept.
pub fn given_as_written(raw: Option<&str>) -> Option<CompactString> {
    let mut n = name(raw)?;
    if let Some(space) = n.find(' ') {
        n.truncate(space);
    }
    Some(n)
}

/// Common English nicknames → full given name.
const NICKNAMES: [(&str, &str); 48] = [
    ("liz", "elizabeth"),
    ("beth", "elizabeth"),
    ("betty", "elizabeth"),
    ("eliza", "elizabeth"),
    ("peggy", "margaret"),
    ("maggie", "margaret"),
    ("meg", "margaret"),
    ("pat", "patricia"),
    ("patty", "patricia"),
    ("trish", "patricia"),
    ("jen", "jennifer"),
    ("jenny", "jennifer"),
    ("sue", "susan"),
    ("susie", "susan"),
    ("bob", "robert"),
    ("rob", "robert"),
    ("bobby", "robert"),
    ("bill", "william"),
    ("will", "william"),
    ("billy", "william"),
    ("liam", "william"),
    ("dick", "richard"),
    ("rick", "richard"),
    ("rich", "richard"),
    ("joe", "joseph"),
    ("joey", "joseph"),
    ("tom", "thomas"),
    ("tommy", "thomas"),
    ("mike", "michael"),
    ("mikey", "michael"),
    ("jim", "james"),
    ("jimmy", "james"),
    ("chuck", "charles"),
    ("charlie", "charles"),
    ("chris", "christopher"),
    ("dan", "daniel"),
    ("danny", "daniel"),
    ("tony", "anthony"),
    ("kate", "katherine"),
    ("kathy", "katherine"),
    ("katie", "katherine"),
    ("steve", "steven"),
    ("andy", "andrew"),
    ("drew", "andrew"),
    ("josh", "joshua"),
    ("dave", "david"),
    ("matt", "matthew"),
    ("nick", "nicholas"),
];

/// A phone number's digits: ten for a North American number (a leading 1
/// dropped), else all of them when there are 7 to 15 (E.164's range), so
/// numbers of other countries compare too.
pub fn phone(raw: Option<&str>) -> Option<CompactString> {
    let digits: CompactString = raw?.chars().filter(char::is_ascii_digit).collect();
    match digits.len() {
        11 if digits.starts_with('1') => Some(digits[1..].into()),
        7..=15 => Some(digits),
        _ => None,
    }
}

/// A person identifier (SSN, national id, insurance member id) in its own
/// shape: letters and digits only, letters upper-cased — never cut to an
/// expected length. `None` for what identifies no one: fewer than 4
/// characters, one character repeated, `123456789`, and for 9-digit US SSNs
/// the numbers never issued (area 000 or 666, group 00, serial 0000).
pub fn identifier(raw: Option<&str>) -> Option<CompactString> {
    let d: CompactString = raw?
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .collect();
    let unissued_ssn = d.len() == 9
        && d.bytes().all(|b| b.is_ascii_digit())
        && (matches!(&d[..3], "000" | "666") || &d[3..5] == "00" || &d[5..] == "0000");
    if d.len() < 4 || d.bytes().all(|b| b == d.as_bytes()[0]) || d == "123456789" || unissued_ssn {
        return None;
    }
    Some(d)
}

pub fn email(raw: Option<&str>) -> Option<CompactString> {
    let e: CompactString = raw?
        .trim()
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (e.contains('@') && e.len() > 3).then_some(e)
}

/// A postal code: the first five digits of a US ZIP (`02139-4307` →
/// `02139`), else the code's letters and digits upper-cased (`sw1a 1aa` →
/// `SW1A1AA`, `2600`) when there are at least three.
pub fn zip(raw: Option<&str>) -> Option<CompactString> {
    let raw = raw?;
    let alnum: CompactString = raw
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .collect();
    let us: CompactString = raw
        .chars()
        .take_while(|c| *c != '-')
        .filter(char::is_ascii_digit)
        .collect();
    if alnum.bytes().all(|b| b.is_ascii_digit()) && us.len() >= 5 {
        Some(us[..5].into())
    } else {
        (alnum.len() >= 3).then_some(alnum)
    }
}

/// A street address with suffixes spelled one way (`street` → `st`).
pub fn address(raw: Option<&str>) -> Option<CompactString> {
    let n = name(raw)?;
    let mut out = CompactString::with_capacity(n.len());
    for w in n.split(' ') {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(match w {
            "street" => "st",
            "avenue" => "ave",
            "road" => "rd",
            "drive" => "dr",
            "lane" => "ln",
            "boulevard" => "blvd",
            "court" => "ct",
            "place" => "pl",
            "apartment" | "apt" | "unit" => "#",
            other => other,
        });
    }
    Some(out)
}

/// American Soundex of a (standardized) name: a blocking key robust to
/// most single-letter typos.
pub fn soundex(name: &str) -> Option<CompactString> {
    let mut chars = name.chars().filter(char::is_ascii_alphabetic);
    let first = chars.next()?;
    let code = |c: char| match c {
        'b' | 'f' | 'p' | 'v' => Some('1'),
        'c' | 'g' | 'j' | 'k' | 'q' | 's' | 'x' | 'z' => Some('2'),
        'd' | 't' => Some('3'),
        'l' => Some('4'),
        'm' | 'n' => Some('5'),
        'r' => Some('6'),
        _ => None,
    };
    let mut out = CompactString::default();
    out.push(first.to_ascii_uppercase());
    let mut last = code(first);
    for c in chars {
        let k = code(c);
        if let Some(digit) = k
            && k != last
        {
            out.push(digit);
            if out.len() == 4 {
                break;
            }
        }
        if c != 'h' && c != 'w' {
            last = k;
        }
    }
    while out.len() < 4 {
        out.push('0');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fold_case_punctuation_diacritics_and_nicknames() {
        assert_eq!(name(Some("  O'Brien-Zoë ")).as_deref(), Some("o brien zoe"));
        assert_eq!(name(Some("--")), None);
        assert_eq!(given(Some("BILL")).as_deref(), Some("william"));
        assert_eq!(given(Some("Liz Ann")).as_deref(), Some("elizabeth"));
        assert_eq!(given(Some("José")).as_deref(), Some("jose"));
    }

    #[test]
    fn names_fold_as_decompose_map_and_split_would() {
        // The plain definition: decompose, drop marks, map, split, join.
        fn reference(raw: &str) -> Option<String> {
            let folded: String = raw
                .nfd()
                .filter(|c| !unicode_normalization::char::is_combining_mark(*c))
                .map(|c| match c.is_alphanumeric() {
                    true => c.to_ascii_lowercase(),
                    false => ' ',
                })
                .filter(|c| c.is_ascii())
                .collect();
            let joined = folded.split_whitespace().collect::<Vec<_>>().join(" ");
            (!joined.is_empty()).then_some(joined)
        }
        for raw in [
            "",
            " ",
            "Ann",
            "  Mary\tJo  ",
            "D'Angelo--Smith",
            "Jøn SSmith",
            "Zoë Ørsted",
            "Åsa-Björk",
            "李 小龙",
            "Nguyễn Văn",
            "42nd st.",
            "a\u{301}b",
            "x\u{2003}y",
            "..,,",
            // Past the stack buffer of ASCII names (64 bytes), and at it.
            "Maximilian-Alexander Fitzgerald-Montgomery Worthington-Smythe III, Esq.",
            "Maximilian Alexander Fitzgerald Montgomery Worthington Smythe..!",
        ] {
            assert_eq!(
                name(Some(raw)).as_deref(),
                reference(raw).as_deref(),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn identifiers_reduce_to_digits_and_drop_placeholders() {
        assert_eq!(
            phone(Some("+1 (428) 555-1265")).as_deref(),
            Some("4285551265")
        );
        assert_eq!(phone(Some("555-1265")).as_deref(), Some("5551265"));
        assert_eq!(
            phone(Some("+44 20 7946 0958")).as_deref(),
            Some("442079460958")
        );
        assert_eq!(phone(Some("12-34")), None);
        assert_eq!(
            identifier(Some("974-61-9629")).as_deref(),
            Some("974619629")
        );
        // Other shapes keep theirs: a 7-digit national id, a member id.
        assert_eq!(identifier(Some("5162373")).as_deref(), Some("5162373"));
        assert_eq!(
            identifier(Some(" xk-0042 17 ")).as_deref(),
            Some("XK004217")
        );
        assert_eq!(identifier(Some("12")), None);
        for placeholder in [
            "000-00-0000",
            "999-99-9999",
            "123-45-6789",
            "666-12-3456",
            "123-00-4567",
        ] {
            assert_eq!(identifier(Some(placeholder)), None, "{placeholder}");
        }
        assert_eq!(zip(Some("14276-2926")).as_deref(), Some("14276"));
        assert_eq!(zip(Some("2600")).as_deref(), Some("2600"));
        assert_eq!(zip(Some("sw1a 1aa")).as_deref(), Some("SW1A1AA"));
        assert_eq!(zip(Some("-")), None);
        assert_eq!(
            email(Some(" A.B@Example.org ")).as_deref(),
            Some("a.b@example.org")
        );
        assert_eq!(
            address(Some("8461 Maple Street")).as_deref(),
            Some("8461 maple st")
        );
    }

    #[test]
    fn soundex_matches_the_reference_codes() {
        for (n, code) in [
            ("robert", "R163"),
            ("rupert", "R163"),
            ("ashcraft", "A261"),
            ("tymczak", "T522"),
            ("pfister", "P236"),
            ("lee", "L000"),
        ] {
            assert_eq!(soundex(n).as_deref(), Some(code), "{n}");
        }
    }
}
