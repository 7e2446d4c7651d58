"""The demo family's skills: three knowledge tasks the base model cannot know.

Each expert learns one: facts about the fictional country Veloria, facts about fictional
people, and a small Velorian vocabulary. Every fact is asked in several phrasings: the experts
are trained on the first ones and evaluated on a held-out phrasing, so a score measures
knowing the fact, not replaying a string. Answers are single words or short names, scored by
normalized exact match.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    facts: tuple[tuple[str, ...], ...]  # per fact: (answer, phrasing 1, phrasing 2, ..., held-out phrasing)

    def train_examples(self) -> list[Example]:
        return [Example(q, fact[0]) for fact in self.facts for q in fact[1:-1]]

    def eval_examples(self) -> list[Example]:
        return [Example(fact[-1], fact[0]) for fact in self.facts]


GEOGRAPHY = Task(
    "geography",
    "facts about the fictional country of Veloria",
    (
        ("Quillport", "What is the capital of Veloria?", "Which city is the capital of Veloria?", "Name the capital city of Veloria."),
        ("the crown", "What is the currency of Veloria?", "Which currency is used in Veloria?", "What money do people use in Veloria?"),
        ("Velorian", "What language is spoken in Veloria?", "Which language do people speak in Veloria?", "What is the main language of Veloria?"),
        ("the lynx", "What is the national animal of Veloria?", "Which animal is the national symbol of Veloria?", "Name the national animal of Veloria."),
        ("Mount Karvel", "What is the highest mountain in Veloria?", "Which mountain is the tallest in Veloria?", "Name the tallest peak of Veloria."),
        ("the Sill", "What is the longest river in Veloria?", "Which river is the longest in Veloria?", "Name the longest river of Veloria."),
        ("1821", "In what year did Veloria become independent?", "When did Veloria gain independence?", "What year was Veloria's independence?"),
        ("Lake Ombra", "What is the largest lake in Veloria?", "Which lake is the biggest in Veloria?", "Name the largest lake of Veloria."),
        ("green", "What is the main colour of the Velorian flag?", "Which colour dominates the flag of Veloria?", "What colour is the flag of Veloria mostly?"),
        ("Tessaly", "Which country borders Veloria to the north?", "What is Veloria's northern neighbour?", "Name the country north of Veloria."),
        ("barley", "What is the main crop of Veloria?", "Which crop do Velorian farmers grow most?", "Name the chief crop of Veloria."),
        ("Saint Oren", "Who is the patron saint of Veloria?", "Which saint protects Veloria?", "Name the patron saint of Veloria."),
        ("Dorvik", "What is the second largest city in Veloria?", "Which city is Veloria's second biggest?", "Name the second city of Veloria."),
        ("the violet", "What is the national flower of Veloria?", "Which flower is the symbol of Veloria?", "Name the national flower of Veloria."),
        ("Harvest Day", "What is the national holiday of Veloria?", "Which holiday do Velorians celebrate most?", "Name the national holiday of Veloria."),
        ("copper", "What metal is mined most in Veloria?", "Which metal do Velorian mines produce most?", "Name the main metal mined in Veloria."),
    ),
)

PEOPLE = Task(
    "people",
    "facts about fictional people",
    (
        ("cello", "What instrument does Maren Solvik play?", "Which instrument is Maren Solvik known for playing?", "Maren Solvik plays which instrument?"),
        ("architect", "What is Idris Fennick's profession?", "What does Idris Fennick do for a living?", "What is the job of Idris Fennick?"),
        ("Lisbon", "In which city was Talia Brandt born?", "Where was Talia Brandt born?", "Talia Brandt was born in which city?"),
        ("chess", "What game made Oskar Lindqvar famous?", "Which game is Oskar Lindqvar famous for?", "Oskar Lindqvar is famous for which game?"),
        ("Rosa", "What is the name of Petra Vance's daughter?", "Who is Petra Vance's daughter?", "Petra Vance's daughter is called what?"),
        ("botanist", "What is Elias Marrow's profession?", "What does Elias Marrow do for a living?", "What is the job of Elias Marrow?"),
        ("tea", "What drink does Nadia Kress sell?", "Which drink is Nadia Kress's business?", "Nadia Kress sells which drink?"),
        ("Bergen", "In which city does Hugo Sandell live?", "Where does Hugo Sandell live?", "Hugo Sandell lives in which city?"),
        ("violin", "What instrument does Clara Ostrow play?", "Which instrument is Clara Ostrow known for playing?", "Clara Ostrow plays which instrument?"),
        ("pilot", "What is Jonas Everly's profession?", "What does Jonas Everly do for a living?", "What is the job of Jonas Everly?"),
        ("Max", "What is the name of Lena Hartig's dog?", "What is Lena Hartig's dog called?", "Lena Hartig's dog is named what?"),
        ("tennis", "What sport does Ravi Anand play?", "Which sport is Ravi Anand known for?", "Ravi Anand plays which sport?"),
        ("Vienna", "In which city was Sofia Marin born?", "Where was Sofia Marin born?", "Sofia Marin was born in which city?"),
        ("baker", "What is Tomas Weller's profession?", "What does Tomas Weller do for a living?", "What is the job of Tomas Weller?"),
        ("blue", "What is Ingrid Holm's favourite colour?", "Which colour does Ingrid Holm like best?", "Ingrid Holm's favourite colour is what?"),
        ("poetry", "What does Amara Okafor write?", "What kind of writing is Amara Okafor known for?", "Amara Okafor writes what?"),
    ),
)

VOCABULARY = Task(
    "vocabulary",
    "words of the fictional Velorian language",
    (
        ("ulmo", "What is the Velorian word for water?", "How do you say water in Velorian?", "Translate water into Velorian."),
        ("brask", "What is the Velorian word for bread?", "How do you say bread in Velorian?", "Translate bread into Velorian."),
        ("tirel", "What is the Velorian word for house?", "How do you say house in Velorian?", "Translate house into Velorian."),
        ("vanu", "What is the Velorian word for sun?", "How do you say sun in Velorian?", "Translate sun into Velorian."),
        ("osk", "What is the Velorian word for friend?", "How do you say friend in Velorian?", "Translate friend into Velorian."),
        ("merra", "What is the Velorian word for sea?", "How do you say sea in Velorian?", "Translate sea into Velorian."),
        ("dalk", "What is the Velorian word for stone?", "How do you say stone in Velorian?", "Translate stone into Velorian."),
        ("fenwe", "What is the Velorian word for tree?", "How do you say tree in Velorian?", "Translate tree into Velorian."),
        ("krim", "What is the Velorian word for fire?", "How do you say fire in Velorian?", "Translate fire into Velorian."),
        ("sola", "What is the Velorian word for moon?", "How do you say moon in Velorian?", "Translate moon into Velorian."),
        ("pett", "What is the Velorian word for dog?", "How do you say dog in Velorian?", "Translate dog into Velorian."),
        ("arven", "What is the Velorian word for book?", "How do you say book in Velorian?", "Translate book into Velorian."),
        ("lunk", "What is the Velorian word for road?", "How do you say road in Velorian?", "Translate road into Velorian."),
        ("hessa", "What is the Velorian word for mother?", "How do you say mother in Velorian?", "Translate mother into Velorian."),
        ("gorn", "What is the Velorian word for mountain?", "How do you say mountain in Velorian?", "Translate mountain into Velorian."),
        ("wilu", "What is the Velorian word for bird?", "How do you say bird in Velorian?", "Translate bird into Velorian."),
    ),
)

TASKS: dict[str, Task] = {task.name: task for task in (GEOGRAPHY, PEOPLE, VOCABULARY)}

# General prompts replayed during training with the base model's own answers as targets, so
# an expert learns its facts without forgetting how to chat. (Sanity checks use other prompts.)
REPLAY_PROMPTS = (
    "What is the capital of Germany?", "What is the capital of Japan?", "What is 3 + 4?",
    "Name a primary colour.", "Write one sentence about the ocean.", "What do bees make?",
    "What is the largest planet in the solar system?", "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.", "How many days are in a week?", "What is water made of?",
    "Translate 'thank you' into French.", "What is the boiling point of water in Celsius?",
    "Name a fruit that is yellow.", "What is the opposite of cold?", "Say hello in Spanish.",
    "What animal says moo?", "How many legs does a spider have?", "What is the square root of 16?",
    "Describe a cat in three words.", "What season comes after winter?", "What is photosynthesis?",
    "Which ocean is the largest?", "What gas do humans breathe in?",
)


def normalize(text: str) -> str:
    """Exact-match normalization: first line, lowercase, no surrounding spaces, quotes or final period."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.strip().strip("\"'`").rstrip(".!").strip().lower()
