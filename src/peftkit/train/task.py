"""The built-in task: customer-support tickets in free text to a strict JSON record.

A realistic enterprise adaptation that the base model does not do by itself: the record has a fixed key
order and fixed vocabularies, and every field needs normalization:

- order_id: the order number, however the customer wrote it ("#48213", "order no. 48213", "ord48213"),
  as "ORD-48213";
- category: one of damaged, late, wrong_item, refund, billing, from the way the problem is described;
- product: the catalogue name (a "headset" or "earbuds" is "headphones", a "notebook" is "laptop");
- priority: "high" when the customer signals urgency (asap, urgent, right away, ...), else "normal".

Examples are generated procedurally from a seed, so the training set is as large as wanted and the
held-out evaluation set is fixed (its own seed, and no ticket text shared with training). Scoring is
exact match: the generated answer, stripped of surrounding whitespace, must equal the record string.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

SYSTEM = "Convert the customer support ticket into a JSON record."
EVAL_SEED = 20_261_129
EVAL_SIZE = 100

PRODUCTS = {
    "headphones": ["headphones", "headset", "earbuds", "head phones"],
    "laptop": ["laptop", "notebook", "notebook computer"],
    "phone": ["phone", "smartphone", "mobile"],
    "monitor": ["monitor", "display", "computer screen"],
    "keyboard": ["keyboard", "mechanical keyboard", "keybord"],
    "charger": ["charger", "charging cable", "power adapter"],
}

CATEGORIES = {
    "damaged": ["my {p} arrived broken", "the {p} came with a cracked case", "the {p} is damaged, the box was crushed",
                "the {p} stopped working after one day", "received the {p} but it won't turn on"],
    "late": ["I'm still waiting for my {p}", "my {p} hasn't arrived yet", "tracking says delivered but there is no {p}",
             "where is my {p}? it's been two weeks", "the {p} delivery is over a week late"],
    "wrong_item": ["I ordered a {p} but got something else", "you sent me the wrong {p}",
                   "the package had a different {p} model than I ordered", "got a {p} in the wrong color"],
    "refund": ["I want my money back for the {p}", "please refund the {p}", "cancel the {p} and refund me",
               "I returned the {p} and need the refund"],
    "billing": ["I was charged twice for the {p}", "the invoice for my {p} is wrong",
                "there's a double charge on my card for the {p}", "I was billed the wrong price for the {p}"],
}

ORDER_FORMATS = ["order #{n}", "order {n}", "order no. {n}", "order number {n}", "ord{n}", "#{n}"]
URGENT = ["this is urgent", "please fix this asap", "I need this resolved immediately", "URGENT, please help",
          "please handle this right away", "need an answer today"]
CALM = ["thanks in advance", "no rush", "thank you", "let me know what you can do", "appreciate your help", ""]
GREETINGS = ["Hi,", "Hello,", "Hey team,", "Dear support,", "", "Good morning,"]
NAMES = ["Dana", "Priya", "Marco", "Li Wei", "Sam", "Olga", "Tunde", "Aiko", "Jonas", "Fatima", "Chris", "Ines"]


@dataclass(frozen=True)
class Ticket:
    text: str
    record: dict

    @property
    def answer(self) -> str:
        """The target: the record as compact, key-ordered JSON."""
        return json.dumps(self.record)

    def messages(self, with_answer: bool = True) -> list[dict]:
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.text}]
        if with_answer:
            msgs.append({"role": "assistant", "content": self.answer})
        return msgs


def make_ticket(rng: random.Random) -> Ticket:
    """One ticket: a greeting, the problem (mentioning the product and the order), an urgency cue or
    a calm closing, and a signature, with casing and punctuation varied the way people write."""
    product = rng.choice(list(PRODUCTS))
    category = rng.choice(list(CATEGORIES))
    number = str(rng.randint(10_000, 99_999))
    urgent = rng.random() < 0.4
    problem = rng.choice(CATEGORIES[category]).format(p=rng.choice(PRODUCTS[product]))
    order = rng.choice(ORDER_FORMATS).format(n=number)
    if rng.random() < 0.5:
        body = f"{problem} ({order})." if rng.random() < 0.5 else f"{problem}, {order}."
    else:
        body = f"About {order}: {problem}."
    closing = rng.choice(URGENT) if urgent else rng.choice(CALM)
    parts = [rng.choice(GREETINGS), body[0].upper() + body[1:], closing + ("!" if urgent else ".") if closing else "",
             f"- {rng.choice(NAMES)}"]
    text = " ".join(p for p in parts if p)
    if rng.random() < 0.25:
        text = text.lower()
    record = {"order_id": f"ORD-{number}", "category": category, "product": product,
              "priority": "high" if urgent else "normal"}
    return Ticket(text, record)


def eval_set(size: int = EVAL_SIZE) -> list[Ticket]:
    """The fixed held-out set (its own seed; the same on every machine and every run)."""
    rng = random.Random(EVAL_SEED)
    return [make_ticket(rng) for _ in range(size)]


def train_set(size: int, seed: int = 0) -> list[Ticket]:
    """`size` training tickets from `seed`, none with the text of an evaluation ticket."""
    held_out = {t.text for t in eval_set()}
    rng = random.Random(seed)
    out: list[Ticket] = []
    while len(out) < size:
        ticket = make_ticket(rng)
        if ticket.text not in held_out:
            out.append(ticket)
    return out


def train_records(size: int, seed: int = 0) -> list[dict]:
    """Training tickets as chat records ({"messages": [...]}), the format `peftkit train` reads."""
    return [{"messages": t.messages()} for t in train_set(size, seed)]


def exact_match(predictions: list[str], tickets: list[Ticket]) -> float:
    """Share of predictions that equal the record string exactly (after stripping whitespace)."""
    if not tickets:
        return 0.0
    return sum(p.strip() == t.answer for p, t in zip(predictions, tickets, strict=True)) / len(tickets)
