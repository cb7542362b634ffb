//! `train.model`: a model kind by its short name (`mlp`), or a mapping that also sizes it
//! (`{kind: mlp, hidden: [256, 128]}`). Sizes left out are the short name's.

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{ModelKind, SpecError};

/// The sizes of each kind when the spec gives none: the models of the short names.
pub mod defaults {
    pub const MLP_HIDDEN: [u32; 1] = [128];
    pub const CNN_CHANNELS: [u32; 2] = [16, 32];
    pub const LAYERS: u32 = 2;
    pub const WIDTH: u32 = 64;
    pub const HEADS: u32 = 4;
    pub const CONTEXT: u32 = 64;
}

/// The most a spec may size a model to: enough for what a single node trains, small enough
/// that a typo (`width: 51200`) is an error, not an out-of-memory kill minutes later.
pub mod limits {
    pub const MLP_LAYERS: usize = 16;
    pub const MLP_WIDTH: u32 = 65_536;
    pub const CNN_BLOCKS: usize = 8;
    pub const CNN_CHANNELS: u32 = 4_096;
    pub const LAYERS: u32 = 64;
    pub const WIDTH: u32 = 8_192;
    pub const CONTEXT: u32 = 8_192;
}

/// A model and its sizes. A size that is `None` takes [`defaults`]; sizes apply to one kind
/// each (`hidden` to the MLP, `channels` and `image` to the CNN, the rest to the transformer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ModelSpec {
    pub kind: ModelKind,
    /// The MLP's hidden layers, input side first.
    pub hidden: Option<Vec<u32>>,
    /// The CNN's conv blocks' output channels (each block halves height and width).
    pub channels: Option<Vec<u32>>,
    /// The CNN's input, [channels, height, width]: it must be the data set's (1 channel for
    /// grey, 3 for colour; the digits are [1, 8, 8]).
    pub image: Option<[u32; 3]>,
    /// The transformer's blocks, width (embedding size), attention heads and context (tokens
    /// read at once).
    pub layers: Option<u32>,
    pub width: Option<u32>,
    pub heads: Option<u32>,
    pub context: Option<u32>,
}

impl ModelSpec {
    /// The model of a short name, with its default sizes.
    pub fn of(kind: ModelKind) -> ModelSpec {
        ModelSpec { kind, ..ModelSpec::default() }
    }

    /// Whether both build the same model, sizes left out or not.
    pub fn same_model(&self, other: &ModelSpec) -> bool {
        let sizes = |m: &ModelSpec| (m.kind, m.hidden(), m.channels(), m.layers(), m.width(), m.heads(), m.context());
        sizes(self) == sizes(other)
    }

    /// Whether any size was given: a spec without sizes is written back as its short name.
    pub fn is_sized(&self) -> bool {
        self.hidden.is_some()
            || self.channels.is_some()
            || self.image.is_some()
            || self.layers.is_some()
            || self.width.is_some()
            || self.heads.is_some()
            || self.context.is_some()
    }

    pub fn hidden(&self) -> Vec<u32> {
        self.hidden.clone().unwrap_or_else(|| defaults::MLP_HIDDEN.to_vec())
    }

    pub fn channels(&self) -> Vec<u32> {
        self.channels.clone().unwrap_or_else(|| defaults::CNN_CHANNELS.to_vec())
    }

    /// Checks the CNN (or an MLP) can read `image` ([channels, height, width]) as the data set
    /// gives it: the spec's `image` must say the same, and each CNN block halves the sides.
    pub fn check_image(&self, image: [u32; 3]) -> Result<(), SpecError> {
        if let Some(given) = self.image
            && given != image
        {
            let reason = format!("is {given:?}, but the data set gives {image:?}");
            return Err(SpecError::new("train.model.image", reason));
        }
        if !matches!(image[0], 1 | 3) {
            return Err(SpecError::new("train.model.image", "channels are 1 (grey) or 3 (colour)"));
        }
        if self.kind == ModelKind::Cnn {
            let halvings = 1u32 << self.channels().len();
            if !image[1].is_multiple_of(halvings) || !image[2].is_multiple_of(halvings) {
                let reason = format!(
                    "{} blocks halve the sides {} times: height and width must be multiples of {halvings}, got {}x{}",
                    self.channels().len(),
                    self.channels().len(),
                    image[1],
                    image[2]
                );
                return Err(SpecError::new("train.model.channels", reason));
            }
        }
        Ok(())
    }

    pub fn layers(&self) -> u32 {
        self.layers.unwrap_or(defaults::LAYERS)
    }

    pub fn width(&self) -> u32 {
        self.width.unwrap_or(defaults::WIDTH)
    }

    pub fn heads(&self) -> u32 {
        self.heads.unwrap_or(defaults::HEADS)
    }

    pub fn context(&self) -> u32 {
        self.context.unwrap_or(defaults::CONTEXT)
    }

    /// The rules of the sizes; field names in errors are `train.model.*`.
    pub fn validate(&self) -> Result<(), SpecError> {
        let field = |name: &str| format!("train.model.{name}");
        // Each size applies to one kind.
        let sizes = [
            ("hidden", self.hidden.is_some(), ModelKind::Mlp),
            ("channels", self.channels.is_some(), ModelKind::Cnn),
            ("image", self.image.is_some(), ModelKind::Cnn),
            ("layers", self.layers.is_some(), ModelKind::Transformer),
            ("width", self.width.is_some(), ModelKind::Transformer),
            ("heads", self.heads.is_some(), ModelKind::Transformer),
            ("context", self.context.is_some(), ModelKind::Transformer),
        ];
        if let Some((name, _, kind)) = sizes.iter().find(|(_, given, kind)| *given && *kind != self.kind) {
            return Err(SpecError::new(field(name), format!("applies to `{kind}` only")));
        }
        match self.kind {
            ModelKind::Mlp => {
                let (layers, width) = (limits::MLP_LAYERS, limits::MLP_WIDTH);
                check_list(field("hidden"), &self.hidden(), layers, width, "layer widths", "widths are")
            }
            ModelKind::Cnn => {
                let (blocks, channels) = (limits::CNN_BLOCKS, limits::CNN_CHANNELS);
                check_list(field("channels"), &self.channels(), blocks, channels, "blocks' channels", "are")
            }
            ModelKind::Transformer => {
                let in_range = |name: &str, v: u32, lo: u32, hi: u32| match (lo..=hi).contains(&v) {
                    true => Ok(()),
                    false => Err(SpecError::new(field(name), format!("must be {lo} to {hi}, got {v}"))),
                };
                in_range("layers", self.layers(), 1, limits::LAYERS)?;
                in_range("width", self.width(), 8, limits::WIDTH)?;
                in_range("heads", self.heads(), 1, self.width())?;
                in_range("context", self.context(), 2, limits::CONTEXT)?;
                if !self.width().is_multiple_of(self.heads()) {
                    return Err(SpecError::new(
                        field("heads"),
                        format!("must divide width {} (each head gets an equal share)", self.width()),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// A list of sizes (the MLP's widths, the CNN's channels): 1 to `max_len` entries, each 1 to
/// `max_value`. `listed` names the entries in the first error, `each` starts the second.
fn check_list(
    field: String,
    values: &[u32],
    max_len: usize,
    max_value: u32,
    listed: &str,
    each: &str,
) -> Result<(), SpecError> {
    if values.is_empty() || values.len() > max_len {
        return Err(SpecError::new(field, format!("must list 1 to {max_len} {listed}")));
    }
    match values.iter().find(|v| **v == 0 || **v > max_value) {
        Some(v) => Err(SpecError::new(field, format!("{each} 1 to {max_value}, got {v}"))),
        None => Ok(()),
    }
}

impl std::fmt::Display for ModelSpec {
    /// The short name, with the sizes where the spec gave any, without spaces (progress lines
    /// are `key=value` pairs): `transformer(layers=4,width=256,heads=4,context=128)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind.name())?;
        if !self.is_sized() {
            return Ok(());
        }
        match self.kind {
            ModelKind::Mlp => {
                let hidden: Vec<String> = self.hidden().iter().map(u32::to_string).collect();
                write!(f, "(hidden={})", hidden.join("x"))
            }
            ModelKind::Cnn => {
                let channels: Vec<String> = self.channels().iter().map(u32::to_string).collect();
                write!(f, "(channels={}", channels.join("x"))?;
                match self.image {
                    Some([c, h, w]) => write!(f, ",image={c}x{h}x{w})"),
                    None => f.write_str(")"),
                }
            }
            ModelKind::Transformer => write!(
                f,
                "(layers={},width={},heads={},context={})",
                self.layers(),
                self.width(),
                self.heads(),
                self.context()
            ),
        }
    }
}

/// The mapping form, as written.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sized {
    kind: ModelKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hidden: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    channels: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<[u32; 3]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    layers: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    heads: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    context: Option<u32>,
}

impl Serialize for ModelSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if !self.is_sized() {
            return self.kind.serialize(s);
        }
        let m = self.clone();
        Sized {
            kind: m.kind,
            hidden: m.hidden,
            channels: m.channels,
            image: m.image,
            layers: m.layers,
            width: m.width,
            heads: m.heads,
            context: m.context,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for ModelSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NameOrSized)
    }
}

struct NameOrSized;

impl<'de> Visitor<'de> for NameOrSized {
    type Value = ModelSpec;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a model name (mlp, cnn, transformer) or a mapping such as {kind: mlp, hidden: [256, 128]}")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<ModelSpec, E> {
        name.parse().map(ModelSpec::of).map_err(E::custom)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ModelSpec, A::Error> {
        let s = Sized::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(ModelSpec {
            kind: s.kind,
            hidden: s.hidden,
            channels: s.channels,
            image: s.image,
            layers: s.layers,
            width: s.width,
            heads: s.heads,
            context: s.context,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<ModelSpec, String> {
        serde_yaml::from_str::<ModelSpec>(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn a_short_name_and_a_sized_mapping_both_parse_and_round_trip() {
        assert_eq!(parse("cnn").unwrap(), ModelSpec::of(ModelKind::Cnn));
        let sized = parse("{kind: transformer, layers: 6, width: 512, heads: 8, context: 256}").unwrap();
        assert_eq!((sized.layers(), sized.width(), sized.heads(), sized.context()), (6, 512, 8, 256));
        assert_eq!(sized.to_string(), "transformer(layers=6,width=512,heads=8,context=256)");
        let cnn = parse("{kind: cnn, channels: [32, 64], image: [3, 64, 64]}").unwrap();
        assert_eq!(cnn.to_string(), "cnn(channels=32x64,image=3x64x64)");
        assert!(cnn.validate().is_ok());
        for spec in [ModelSpec::of(ModelKind::Mlp), sized, cnn, parse("{kind: mlp, hidden: [256, 128]}").unwrap()] {
            let yaml = serde_yaml::to_string(&spec).unwrap();
            assert_eq!(parse(&yaml).unwrap(), spec, "{yaml}");
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(serde_json::from_str::<ModelSpec>(&json).unwrap(), spec, "{json}");
        }
        assert_eq!(serde_yaml::to_string(&ModelSpec::of(ModelKind::Mlp)).unwrap(), "mlp\n");
        let partly = parse("{kind: transformer, layers: 4}").unwrap();
        assert_eq!((partly.layers(), partly.width()), (4, defaults::WIDTH));
    }

    #[test]
    fn unknown_names_fields_and_sizes_of_another_kind_are_refused_by_name() {
        assert!(parse("resnet").unwrap_err().contains("unknown model `resnet`"));
        assert!(parse("{kind: mlp, depth: 3}").unwrap_err().contains("unknown field `depth`"));
        let invalid = |yaml: &str| parse(yaml).unwrap().validate().unwrap_err().to_string();
        assert_eq!(invalid("{kind: mlp, width: 3}"), "train.model.width: applies to `transformer` only");
        assert_eq!(invalid("{kind: transformer, hidden: [3]}"), "train.model.hidden: applies to `mlp` only");
        assert_eq!(invalid("{kind: mlp, hidden: []}"), "train.model.hidden: must list 1 to 16 layer widths");
        assert_eq!(invalid("{kind: mlp, hidden: [8, 0]}"), "train.model.hidden: widths are 1 to 65536, got 0");
        assert_eq!(
            invalid("{kind: transformer, width: 100, heads: 8}"),
            "train.model.heads: must divide width 100 (each head gets an equal share)"
        );
        assert_eq!(
            invalid("{kind: transformer, context: 100000}"),
            "train.model.context: must be 2 to 8192, got 100000"
        );
        assert!(parse("{kind: mlp, hidden: [64, 32]}").unwrap().validate().is_ok());
        assert_eq!(invalid("{kind: mlp, channels: [3]}"), "train.model.channels: applies to `cnn` only");
        assert_eq!(invalid("{kind: cnn, channels: []}"), "train.model.channels: must list 1 to 8 blocks' channels");
        let cnn = parse("{kind: cnn, channels: [8, 8, 8]}").unwrap();
        let err = cnn.check_image([3, 20, 16]).unwrap_err().to_string();
        assert_eq!(
            err,
            "train.model.channels: 3 blocks halve the sides 3 times: height and width must be multiples of 8, got 20x16"
        );
        assert!(cnn.check_image([3, 24, 16]).is_ok());
        let err = parse("{kind: cnn, image: [1, 8, 8]}").unwrap().check_image([3, 8, 8]).unwrap_err().to_string();
        assert_eq!(err, "train.model.image: is [1, 8, 8], but the data set gives [3, 8, 8]");
    }
}
