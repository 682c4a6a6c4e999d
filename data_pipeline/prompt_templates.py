"""DreamBench-style prompt templates for the five SuTI skills, and instructions for a language model.

`{s}` is the subject as prompts name it: a rare token plus the class noun ("sks ball"), never its colour
or pattern (as in DreamBench: the identity is visible only in the demonstrations). Phrases match the toy world's
vocabulary (backgrounds, accessories, styles, sizes) so its experts can render them; they read as
ordinary prompts at full scale too.
"""
from __future__ import annotations

SKILLS: tuple[str, ...] = ("recontextualization", "accessorization", "property", "style", "viewpoint")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "recontextualization": (
        "a {s} on the beach", "a {s} on the grass", "a {s} in the snow", "a {s} at night",
        "a {s} in the sky", "a {s} floating in the ocean", "a {s} in the city", "a {s} in a room",
    ),
    "accessorization": (
        "a {s} wearing a hat on the grass", "a {s} wearing a crown in a room",
        "a {s} wearing sunglasses on the beach", "a {s} wearing a hat in the snow",
        "a {s} wearing a crown in the city", "a {s} wearing sunglasses at night",
    ),
    "property": (
        "a red {s} on the grass", "a blue {s} on the beach", "a purple {s} in a room",
        "a yellow {s} in the snow", "a shiny {s} in the city", "a wet {s} floating in the ocean",
    ),
    "style": (
        "a sketch of a {s} on the grass", "a sketch of a {s} on the beach",
        "a black and white photo of a {s} in the snow", "a black and white photo of a {s} in the city",
        "a watercolor painting of a {s} in the sky", "a pencil drawing of a {s} in a room",
    ),
    "viewpoint": (
        "a close-up of a large {s} on the grass", "a small {s} seen from far away on the beach",
        "a large {s} in a room", "a small {s} in the sky", "a top view of a {s} on the grass",
        "a small {s} floating in the ocean",
    ),
}

# Instructions for the text-generation backend: it completes the text after "Prompt:".
LM_INSTRUCTIONS: dict[str, str] = {
    "recontextualization": "Write a short image prompt that shows the {s} in a new place.",
    "accessorization": "Write a short image prompt that shows the {s} wearing an accessory.",
    "property": "Write a short image prompt that shows the {s} with a changed colour or material.",
    "style": "Write a short image prompt that shows the {s} in an artistic style.",
    "viewpoint": "Write a short image prompt that shows the {s} from a new viewpoint.",
}

# Alt texts that say nothing about the image.
BOILERPLATE: frozenset[str] = frozenset({
    "image", "photo", "picture", "thumbnail", "product photo", "product image", "click to enlarge",
    "untitled", "new arrival", "best seller", "sale", "no description", "default", "img", "jpg",
})
