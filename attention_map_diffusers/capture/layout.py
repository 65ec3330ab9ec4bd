"""Where the image queries and the text keys lie on a joint attention sequence: :class:`Layout`.

SD3 concatenates ``[image, text]`` (image rows first); FLUX.1 concatenates ``[text, image]`` in its
joint blocks and its single blocks alike. Everything that cuts a joint q / k / lse (the
probabilities, the lse paths and their self-checks) reads the cut from one ``Layout``, so the two
families share all of that code.
"""

from __future__ import annotations

from typing import NamedTuple


class Layout(NamedTuple):
    """The joint sequence of one attention call: N image tokens and T text tokens, L = N + T.

    Attributes:
        num_image: N.
        num_text: T.
        text_first: True for ``[text, image]`` (FLUX.1), False for ``[image, text]`` (SD3).
    """

    num_image: int
    num_text: int
    text_first: bool = False

    @property
    def length(self) -> int:
        return self.num_image + self.num_text

    @property
    def image(self) -> slice:
        """The image positions (rows of the queries we record)."""
        return slice(self.num_text, self.length) if self.text_first else slice(0, self.num_image)

    @property
    def text(self) -> slice:
        """The text positions (columns of the keys we record)."""
        return slice(0, self.num_text) if self.text_first else slice(self.num_image, self.length)
