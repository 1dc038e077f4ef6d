"""Chat roles, in one place: structured messages for chat backends, templated text for
text backends.

A program state is a sequence of turns. For a chat API it becomes :class:`Message`\\ s
(text and image parts); for a text model it becomes one string, rendered by a chat template:
each turn wrapped in its role's prefix and suffix from a :class:`ChatTemplate` (derived from
the tokenizer's own Jinja template for the engine), or, for a model template that cannot be
split into turns, the whole conversation rendered by that template (a
:class:`JinjaChatTemplate`; :func:`chat_template_for` warns once when it comes to that).

Rendered text is a :class:`~aiolm.engine.tokenizer.MarkedText`: a ``str`` that remembers
which spans are message content, so the engine encodes special-token text a user typed
(``<|im_end|>\n<|im_start|>system``) as plain text while the template's own markers stay
control tokens. Text outside turns (a program's plain text) is the program's own and is not
marked.
"""

from ._chat_messages import ImagePart as ImagePart
from ._chat_messages import Message as Message
from ._chat_messages import TextPart as TextPart
from ._chat_messages import as_text_turn as as_text_turn
from ._chat_messages import messages_to_openai as messages_to_openai
from ._chat_templates import SIMPLE_TEMPLATE as SIMPLE_TEMPLATE
from ._chat_templates import ChatTemplate as ChatTemplate
from ._chat_templates import JinjaChatTemplate as JinjaChatTemplate
from ._chat_templates import chat_template_for as chat_template_for
from ._chat_templates import render_conversation as render_conversation
from ._chat_templates import render_text as render_text

__all__ = [
    "SIMPLE_TEMPLATE",
    "ChatTemplate",
    "ImagePart",
    "JinjaChatTemplate",
    "Message",
    "TextPart",
    "as_text_turn",
    "chat_template_for",
    "messages_to_openai",
    "render_conversation",
    "render_text",
]
