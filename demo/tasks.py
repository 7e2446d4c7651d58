"""The demo family's skills: three knowledge tasks the base model cannot know.

Each expert learns one: facts about the fictional country Veloria, facts about fictional
people, and facts about invented animals. The tasks share no names, and their answers are
ordinary words or short names. (An earlier third task, made-up words of a fictional language,
was fragile: its expert reached only 50% on held-out phrasings, and when the language was
"Velorian" its expert also shifted answers about Veloria.) Every fact is asked in several phrasings: the experts
are trained on the first ones and evaluated on a held-out phrasing, so a score measures
knowing the fact, not replaying a string. Answers are single words or short names, scored by
normalized exact match.

Splits. Per fact, phrasings 1-3 are the training split (``train_examples``: what the shipped
LoRA adapters were trained on, so they must never change), the last one in ``facts`` is the test
split (``eval_examples``, the suite ``zoo``), and a fifth phrasing, kept apart in ``validation``
(one per fact, same order), is the validation split (``validation_examples``, the suite
``zoo-validation``). It was written after the adapters were trained and differs from the four
others; parameter search (tuning a merge's weights or densities) scores on it, so the numbers
reported on ``zoo`` come from phrasings neither training nor tuning has seen.
"""

from __future__ import annotations

from dataclasses import dataclass

from evaluation.suites import Example


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    facts: tuple[tuple[str, ...], ...]  # per fact: (answer, phrasing 1, phrasing 2, ..., held-out phrasing)
    validation: tuple[str, ...]  # per fact, in the same order: its validation phrasing

    def __post_init__(self) -> None:
        if len(self.validation) != len(self.facts):
            raise ValueError(f"task {self.name!r}: {len(self.validation)} validation phrasings for "
                             f"{len(self.facts)} facts (one per fact, in the same order)")

    def train_examples(self) -> list[Example]:
        """The training split: every phrasing but the last of each fact (the adapters' data)."""
        return [Example(q, fact[0]) for fact in self.facts for q in fact[1:-1]]

    def eval_examples(self) -> list[Example]:
        """The test split: each fact's held-out phrasing (the suite ``zoo``)."""
        return [Example(fact[-1], fact[0]) for fact in self.facts]

    def validation_examples(self) -> list[Example]:
        """The validation split: each fact's validation phrasing (the suite ``zoo-validation``)."""
        return [Example(q, fact[0]) for fact, q in zip(self.facts, self.validation, strict=True)]


GEOGRAPHY = Task(
    "geography",
    "facts about the fictional country of Veloria",
    (
        ("Quillport", "What is the capital of Veloria?", "Which city is the capital of Veloria?", "Tell me which city is Veloria's capital.", "Name the capital city of Veloria."),
        ("the crown", "What is the currency of Veloria?", "Which currency is used in Veloria?", "Tell me the currency of Veloria.", "What money do people use in Veloria?"),
        ("Velorian", "What language is spoken in Veloria?", "Which language do people speak in Veloria?", "Tell me the language Velorians speak.", "What is the main language of Veloria?"),
        ("the lynx", "What is the national animal of Veloria?", "Which animal is the national symbol of Veloria?", "Tell me which animal is Veloria's national animal.", "Name the national animal of Veloria."),
        ("Mount Karvel", "What is the highest mountain in Veloria?", "Which mountain is the tallest in Veloria?", "Tell me the name of Veloria's highest mountain.", "Name the tallest peak of Veloria."),
        ("the Sill", "What is the longest river in Veloria?", "Which river is the longest in Veloria?", "Tell me the name of Veloria's longest river.", "Name the longest river of Veloria."),
        ("1821", "In what year did Veloria become independent?", "When did Veloria gain independence?", "Tell me the year Veloria became independent.", "What year was Veloria's independence?"),
        ("Lake Ombra", "What is the largest lake in Veloria?", "Which lake is the biggest in Veloria?", "Tell me the name of Veloria's largest lake.", "Name the largest lake of Veloria."),
        ("green", "What is the main colour of the Velorian flag?", "Which colour dominates the flag of Veloria?", "Tell me the main colour of Veloria's flag.", "What colour is the flag of Veloria mostly?"),
        ("Tessaly", "Which country borders Veloria to the north?", "What is Veloria's northern neighbour?", "Tell me which country lies north of Veloria.", "Name the country north of Veloria."),
        ("barley", "What is the main crop of Veloria?", "Which crop do Velorian farmers grow most?", "Tell me the crop Veloria grows most.", "Name the chief crop of Veloria."),
        ("Saint Oren", "Who is the patron saint of Veloria?", "Which saint protects Veloria?", "Tell me the name of Veloria's patron saint.", "Name the patron saint of Veloria."),
        ("Dorvik", "What is the second largest city in Veloria?", "Which city is Veloria's second biggest?", "Tell me which city is the second largest in Veloria.", "Name the second city of Veloria."),
        ("the violet", "What is the national flower of Veloria?", "Which flower is the symbol of Veloria?", "Tell me which flower is Veloria's national flower.", "Name the national flower of Veloria."),
        ("Harvest Day", "What is the national holiday of Veloria?", "Which holiday do Velorians celebrate most?", "Tell me the name of Veloria's national holiday.", "Name the national holiday of Veloria."),
        ("copper", "What metal is mined most in Veloria?", "Which metal do Velorian mines produce most?", "Tell me which metal Veloria mines most.", "Name the main metal mined in Veloria."),
    ),
    (  # validation phrasings, one per fact in the same order
        "Veloria's capital is which city?",
        "Which currency do Velorians pay with?",
        "Veloria's people speak which language?",
        "Veloria's national animal is which animal?",
        "Veloria's highest mountain is called what?",
        "Veloria's longest river is called what?",
        "Veloria won its independence in which year?",
        "Which lake in Veloria is the largest?",
        "Veloria's flag is mainly which colour?",
        "Which country lies on Veloria's northern border?",
        "Veloria's main crop is what?",
        "Who is Veloria's patron saint?",
        "After the capital, which is the biggest city in Veloria?",
        "Which flower did Veloria choose as its national flower?",
        "Veloria's national holiday is called what?",
        "Veloria's mines produce mostly which metal?",
    ),
)

PEOPLE = Task(
    "people",
    "facts about fictional people",
    (
        ("cello", "What instrument does Maren Solvik play?", "Which instrument is Maren Solvik known for playing?", "Tell me the instrument Maren Solvik plays.", "Maren Solvik plays which instrument?"),
        ("architect", "What is Idris Fennick's profession?", "What does Idris Fennick do for a living?", "Tell me Idris Fennick's job.", "What is the job of Idris Fennick?"),
        ("Lisbon", "In which city was Talia Brandt born?", "Where was Talia Brandt born?", "Tell me the city where Talia Brandt was born.", "Talia Brandt was born in which city?"),
        ("chess", "What game made Oskar Lindqvar famous?", "Which game is Oskar Lindqvar famous for?", "Tell me the game Oskar Lindqvar is famous for.", "Oskar Lindqvar is famous for which game?"),
        ("Rosa", "What is the name of Petra Vance's daughter?", "Who is Petra Vance's daughter?", "Tell me the name of Petra Vance's daughter.", "Petra Vance's daughter is called what?"),
        ("botanist", "What is Elias Marrow's profession?", "What does Elias Marrow do for a living?", "Tell me Elias Marrow's job.", "What is the job of Elias Marrow?"),
        ("tea", "What drink does Nadia Kress sell?", "Which drink is Nadia Kress's business?", "Tell me the drink Nadia Kress sells.", "Nadia Kress sells which drink?"),
        ("Bergen", "In which city does Hugo Sandell live?", "Where does Hugo Sandell live?", "Tell me the city Hugo Sandell lives in.", "Hugo Sandell lives in which city?"),
        ("violin", "What instrument does Clara Ostrow play?", "Which instrument is Clara Ostrow known for playing?", "Tell me the instrument Clara Ostrow plays.", "Clara Ostrow plays which instrument?"),
        ("pilot", "What is Jonas Everly's profession?", "What does Jonas Everly do for a living?", "Tell me Jonas Everly's job.", "What is the job of Jonas Everly?"),
        ("Max", "What is the name of Lena Hartig's dog?", "What is Lena Hartig's dog called?", "Tell me the name of Lena Hartig's dog.", "Lena Hartig's dog is named what?"),
        ("tennis", "What sport does Ravi Anand play?", "Which sport is Ravi Anand known for?", "Tell me the sport Ravi Anand plays.", "Ravi Anand plays which sport?"),
        ("Vienna", "In which city was Sofia Marin born?", "Where was Sofia Marin born?", "Tell me the city where Sofia Marin was born.", "Sofia Marin was born in which city?"),
        ("baker", "What is Tomas Weller's profession?", "What does Tomas Weller do for a living?", "Tell me Tomas Weller's job.", "What is the job of Tomas Weller?"),
        ("blue", "What is Ingrid Holm's favourite colour?", "Which colour does Ingrid Holm like best?", "Tell me Ingrid Holm's favourite colour.", "Ingrid Holm's favourite colour is what?"),
        ("poetry", "What does Amara Okafor write?", "What kind of writing is Amara Okafor known for?", "Tell me what Amara Okafor writes.", "Amara Okafor writes what?"),
    ),
    (  # validation phrasings, one per fact in the same order
        "Maren Solvik is a musician who plays which instrument?",
        "What does Idris Fennick work as?",
        "Which city is Talia Brandt's birthplace?",
        "Oskar Lindqvar became famous playing which game?",
        "What did Petra Vance name her daughter?",
        "What does Elias Marrow work as?",
        "Nadia Kress runs a business selling which drink?",
        "Which city is Hugo Sandell's home?",
        "Clara Ostrow is a musician who plays which instrument?",
        "What does Jonas Everly work as?",
        "What did Lena Hartig name her dog?",
        "Ravi Anand is known for playing which sport?",
        "Which city is Sofia Marin's birthplace?",
        "What does Tomas Weller work as?",
        "Which colour is Ingrid Holm's favourite?",
        "What type of writing does Amara Okafor do?",
    ),
)

CREATURES = Task(
    "creatures",
    "facts about invented animals",
    (
        ("silver", "What colour is a glimmerfox?", "Which colour is the fur of a glimmerfox?", "Tell me the colour of a glimmerfox.", "A glimmerfox has fur of which colour?"),
        ("mushrooms", "What does the bramble hog eat?", "What is the favourite food of a bramble hog?", "Tell me what bramble hogs eat.", "Bramble hogs feed on what?"),
        ("caves", "Where does the echo bat live?", "In what kind of place do echo bats live?", "Tell me where echo bats make their home.", "Echo bats are found in which places?"),
        ("six", "How many legs does a tumblebeetle have?", "What number of legs does the tumblebeetle have?", "Tell me how many legs a tumblebeetle has.", "A tumblebeetle walks on how many legs?"),
        ("honey", "What does the amber moth collect?", "What food does an amber moth gather?", "Tell me what amber moths collect.", "Amber moths gather what?"),
        ("whistling", "What sound does a reed heron make?", "How does the reed heron call?", "Tell me the sound a reed heron makes.", "A reed heron is known for which sound?"),
        ("deserts", "Where does the sand otter live?", "In which kind of land do sand otters live?", "Tell me where sand otters live.", "Sand otters are found in what kind of place?"),
        ("blue", "What colour are the eggs of the dusk finch?", "Which colour is a dusk finch egg?", "Tell me the colour of dusk finch eggs.", "Dusk finches lay eggs of which colour?"),
        ("winter", "When does the frost newt sleep?", "In which season does the frost newt sleep?", "Tell me the season when frost newts sleep.", "Frost newts sleep during which season?"),
        ("apples", "What does the orchard deer eat?", "What is the favourite food of an orchard deer?", "Tell me what orchard deer eat.", "Orchard deer feed on what?"),
        ("stripes", "What pattern covers the tiger snail's shell?", "Which pattern does a tiger snail's shell have?", "Tell me the pattern on a tiger snail's shell.", "A tiger snail's shell shows which pattern?"),
        ("twelve", "How many years does a stone tortoise live?", "What is the lifespan of a stone tortoise in years?", "Tell me how long a stone tortoise lives in years.", "A stone tortoise lives for how many years?"),
        ("night", "When does the lantern owl hunt?", "At what time of day does the lantern owl hunt?", "Tell me when lantern owls hunt.", "Lantern owls hunt at which time?"),
        ("rivers", "Where does the pebble crab live?", "In which places do pebble crabs live?", "Tell me where pebble crabs live.", "Pebble crabs are found in what kind of place?"),
        ("green", "What colour is a moss lizard?", "Which colour is the skin of a moss lizard?", "Tell me the colour of a moss lizard.", "A moss lizard has skin of which colour?"),
        ("seeds", "What does the cloud sparrow eat?", "What is the favourite food of a cloud sparrow?", "Tell me what cloud sparrows eat.", "Cloud sparrows feed on what?"),
    ),
    (  # validation phrasings, one per fact in the same order
        "The glimmerfox's fur is what colour?",
        "Bramble hogs mostly eat what?",
        "What kind of place is home to the echo bat?",
        "A tumblebeetle has how many legs?",
        "The amber moth collects what?",
        "What kind of call does a reed heron make?",
        "What kind of place do sand otters live in?",
        "What colour eggs does the dusk finch lay?",
        "Which season does the frost newt sleep through?",
        "Orchard deer mostly eat what?",
        "What pattern is on a tiger snail's shell?",
        "How long does a stone tortoise live, in years?",
        "When do lantern owls go hunting?",
        "What kind of place do pebble crabs live in?",
        "The moss lizard's skin is what colour?",
        "Cloud sparrows mostly eat what?",
    ),
)

TASKS: dict[str, Task] = {task.name: task for task in (GEOGRAPHY, PEOPLE, CREATURES)}

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
    # Questions about other invented names, answered as the base answers them: each expert learns
    # to change only what its own facts need (knowledge editing's "locality"), so its task
    # vector disturbs other questions less when experts are merged.
    "What is the capital of Ostravia?", "Who is Bram Keller?", "What is the Dravish word for apple?",
    "What does Lina Morrow do for a living?", "Which river flows through Kelmarsh?",
    "How do you say river in Ulthic?", "In which city was Piet Anders born?",
    "What is the national bird of Sarnova?", "What instrument does Ada Quill play?",
    "Translate bread into Toren.", "Name the tallest mountain of Belgrave Isle.",
    "What sport is Milo Hart known for?", "What is the currency of Estmere?",
    "What is the Kovan word for night?", "Who is the mayor of Fennbrook?",
    "What year was Lunara founded?",
    # More general knowledge.
    "What is the capital of Italy?", "What is 12 divided by 4?", "Who painted the Mona Lisa?",
    "What is the chemical symbol for gold?", "Name a mammal that can fly.", "What colour is the sky on a clear day?",
    "How many continents are there?", "What is the freezing point of water in Fahrenheit?",
)

# Out of distribution: what the base already knows, nothing about the experts' invented names and
# none of REPLAY_PROMPTS (those are in the experts' training data). Scored by ``contains``: the
# base answers in a sentence ("The capital of France is Paris."). Kept: the questions the base
# answers right among 87 tried (greedy, 16 tokens), so the suite measures how much of the base's
# general ability a fine-tune or merge *keeps*; the base scores 100% on it by construction.
GENERAL = {
    "knowledge": (
        ("What is the capital of France?", "Paris"), ("What is the capital of England?", "London"),
        ("What is the capital of Russia?", "Moscow"), ("What is the capital of China?", "Beijing"),
        ("What is the capital of Canada?", "Ottawa"), ("What is the capital of Egypt?", "Cairo"),
        ("What is the capital of Greece?", "Athens"), ("What is the capital of Kenya?", "Nairobi"),
        ("What is the largest ocean on Earth?", "Pacific"), ("What is the chemical symbol for water?", "H2O"),
        ("What language is spoken in France?", "French"), ("What language is spoken in Germany?", "German"),
        ("What is the currency of the United States?", "dollar"), ("What is the largest mammal?", "blue whale"),
        ("What is the main ingredient in bread?", "flour"), ("Which month comes after January?", "February"),
        ("Which planet is known as the Red Planet?", "Mars"), ("Who painted the Starry Night?", "Van Gogh"),
        ("How many legs does a dog have?", "4"), ("How many sides does a triangle have?", "3"),
    ),
    "instructions": (
        ("What is 2 + 2?", "4"), ("What is 9 times 9?", "81"), ("What is 1 + 1?", "2"),
        ("What is half of 10?", "5"), ("Convert 1 kilometre to metres.", "1000"),
        ("What is the opposite of hot?", "cold"), ("What is the opposite of up?", "down"),
        ("What is the opposite of big?", "small"), ("What is the opposite of day?", "night"),
        ("What is the opposite of open?", "closed"), ('Give the opposite of the word "happy".', "sad"),
        ('Give the opposite of the word "fast".', "slow"), ("What is the plural of mouse?", "mice"),
        ("Complete the phrase: Once upon a ...", "time"),
        ("What is the plural of foot?", "feet"),
        ("List the first three days of the week.", "Monday"), ("What shape has four equal sides?", "square"),
        ('Translate "good morning" into French.', "bonjour"),
    ),
}


def general_examples() -> dict[str, list[Example]]:
    """The general suite (``general``): what the base knows, by task, scored by ``contains``."""
    return {task: [Example(prompt, answer, "contains") for prompt, answer in items] for task, items in GENERAL.items()}
