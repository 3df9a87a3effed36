"""The one error type for bad input (a file, a key, a shape or a value). The CLI maps it to exit 2."""


def one_line(text: str, limit: int = 2000) -> str:
    """``text`` with its control characters escaped (a newline in a key or file name becomes ``\\n``),
    at most ``limit`` characters: a message is one line of stderr."""
    text = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class InputError(ValueError):
    """Bad user input: the message names the file, key, shape or value that is wrong. It is one line
    whatever it quotes (:func:`one_line`)."""

    def __init__(self, message: str):
        super().__init__(one_line(str(message)))
