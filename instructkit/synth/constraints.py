"""Constraint-following prompts in the IFEval input layout, for rejection-sampling training data.

``instructkit synth constraints`` writes prompts made of one short base task (an email, a poem, an
explanation, a summary of a passage written here...) plus 1 to 3 verifiable constraints of the
kinds IFEval checks (lower case, word limits, bullets, JSON, end phrase, postscript...). Each record
carries ``prompt``, ``instruction_id_list`` and ``kwargs`` exactly as IFEval's ``input_data.jsonl``
does, so :func:`instructkit.evaluate.ifeval.scoring.parse_record` validates it and the IFEval
checkers verify a reply, plus ``messages`` (the prompt as one user turn) so ``instructkit
best-of-n --scorer ifeval`` can sample a policy on it and keep only verified replies.

Why this shape: a tiny model learns to follow format constraints best from its *own* replies that
happen to follow them (rejection sampling), and that needs prompts whose constraint is stated in
words and checked by code. Tasks are ones whose natural answer is a few sentences, and arguments
are drawn so that a short reply can satisfy them (word limits of 15 to 100, 2 to 4 bullets...).
Constraint pairs that cannot hold together (lower case + all capitals, JSON + bullets, two
responses + an end phrase...) are never combined (:data:`CONFLICTS`). All text here (tasks,
passages, phrasings) is written for this module; none is taken from the IFEval prompts.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SOURCE = "instructkit-constraints"

# ------------------------------------------------------------------------------------ slot fillers
# Each filler with keywords: (text, words that fit it), used for the keyword constraints.

TOPICS = [
    ("recycling at home", ["plastic", "bin", "waste"]), ("learning to cook", ["kitchen", "recipe", "taste"]),
    ("saving money", ["budget", "spend", "savings"]), ("morning routines", ["coffee", "alarm", "habit"]),
    ("remote work", ["laptop", "schedule", "focus"]), ("city cycling", ["bike", "helmet", "lane"]),
    ("houseplants", ["water", "soil", "light"]), ("learning a new language", ["practice", "words", "grammar"]),
    ("board games", ["dice", "rules", "friends"]), ("camping", ["tent", "fire", "trail"]),
    ("drinking enough water", ["thirst", "bottle", "health"]), ("public libraries", ["books", "quiet", "free"]),
    ("volunteering", ["community", "help", "time"]), ("sleep", ["rest", "night", "dream"]),
    ("rainy days", ["umbrella", "puddle", "cloud"]), ("baking bread", ["flour", "oven", "dough"]),
    ("bird watching", ["feather", "song", "nest"]), ("composting", ["garden", "worms", "scraps"]),
    ("running a first 5k", ["pace", "shoes", "finish"]), ("keeping a journal", ["pen", "page", "thoughts"]),
    ("space exploration", ["rocket", "orbit", "planet"]), ("electric cars", ["battery", "charge", "road"]),
    ("the ocean", ["wave", "salt", "fish"]), ("winter holidays", ["snow", "family", "gift"]),
    ("video games", ["level", "player", "screen"]), ("street food", ["spicy", "stall", "snack"]),
    ("moving to a new city", ["boxes", "neighbors", "map"]), ("learning to swim", ["pool", "breath", "float"]),
    ("honey bees", ["hive", "flower", "pollen"]), ("online privacy", ["password", "account", "data"]),
    ("tea", ["leaves", "cup", "steep"]), ("time management", ["calendar", "task", "deadline"]),
    ("music practice", ["scales", "rhythm", "song"]), ("museums", ["art", "history", "exhibit"]),
    ("public speaking", ["audience", "voice", "nerves"]), ("picnics", ["blanket", "basket", "park"]),
]
OBJECTS = [
    ("a reusable water bottle", ["steel", "cold", "leak"]), ("a folding umbrella", ["rain", "wind", "compact"]),
    ("a desk lamp", ["light", "bright", "bulb"]), ("noise-cancelling headphones", ["quiet", "music", "battery"]),
    ("a cast iron pan", ["heat", "cook", "heavy"]), ("a pair of hiking boots", ["trail", "grip", "comfort"]),
    ("a wool scarf", ["warm", "soft", "winter"]), ("a mechanical keyboard", ["keys", "typing", "click"]),
    ("a houseplant starter kit", ["seeds", "pot", "soil"]), ("a travel backpack", ["pockets", "strap", "trip"]),
    ("a smart alarm clock", ["wake", "morning", "sound"]), ("a bamboo toothbrush", ["teeth", "plastic", "clean"]),
    ("a jigsaw puzzle", ["pieces", "picture", "table"]), ("a camping stove", ["fuel", "flame", "meal"]),
    ("a yoga mat", ["stretch", "floor", "grip"]), ("a coffee grinder", ["beans", "fresh", "aroma"]),
    ("a kids' bicycle", ["wheels", "safe", "ride"]), ("a notebook made of recycled paper", ["pages", "write", "green"]),
    ("a portable speaker", ["sound", "bass", "party"]), ("a rain jacket", ["dry", "hood", "zip"]),
    ("a weekly planner", ["week", "goals", "plan"]), ("a pet water fountain", ["cat", "water", "fresh"]),
]
PLACES = [
    ("a small mountain village", ["snow", "quiet", "cabin"]), ("a busy train station", ["platform", "ticket", "crowd"]),
    ("a seaside town", ["harbor", "boats", "sand"]), ("a desert oasis", ["palm", "sand", "water"]),
    ("an old lighthouse", ["light", "rocks", "sea"]), ("a night market", ["lanterns", "food", "noise"]),
    ("a school library", ["shelves", "books", "students"]), ("a rainforest", ["trees", "rain", "frogs"]),
    ("a rooftop garden", ["plants", "city", "sun"]), ("a quiet lake", ["canoe", "fish", "shore"]),
    ("a space station", ["orbit", "window", "stars"]), ("a bakery at dawn", ["bread", "oven", "flour"]),
    ("a snowy forest", ["pine", "tracks", "cold"]), ("an island ferry", ["deck", "waves", "gulls"]),
    ("a city park", ["bench", "pigeons", "path"]), ("a farm in autumn", ["harvest", "barn", "apples"]),
]
CONCEPTS = [
    ("photosynthesis", ["light", "leaf", "energy"]), ("gravity", ["mass", "fall", "earth"]),
    ("inflation", ["prices", "money", "rise"]), ("the water cycle", ["rain", "cloud", "vapor"]),
    ("compound interest", ["savings", "growth", "rate"]), ("a vaccine", ["immune", "virus", "body"]),
    ("a black hole", ["star", "light", "mass"]), ("recycling", ["waste", "reuse", "plastic"]),
    ("supply and demand", ["price", "buyers", "market"]), ("an algorithm", ["steps", "input", "output"]),
    ("the greenhouse effect", ["heat", "gases", "climate"]), ("a food chain", ["plants", "animals", "energy"]),
    ("democracy", ["vote", "people", "power"]), ("the internet", ["network", "data", "computers"]),
    ("evaporation", ["water", "heat", "vapor"]), ("a solar eclipse", ["moon", "sun", "shadow"]),
    ("friction", ["surface", "force", "heat"]), ("a budget", ["income", "spending", "plan"]),
    ("tides", ["moon", "ocean", "pull"]), ("an echo", ["sound", "wall", "return"]),
    ("a rainbow", ["light", "colors", "rain"]), ("magnetism", ["magnet", "iron", "poles"]),
    ("a habit", ["repeat", "routine", "brain"]), ("fermentation", ["yeast", "sugar", "bread"]),
]
ANIMALS = [("a cat", ["whiskers", "nap", "paws"]), ("an octopus", ["arms", "ink", "ocean"]),
           ("a penguin", ["ice", "swim", "waddle"]), ("a dog", ["bark", "walk", "tail"]),
           ("an owl", ["night", "hoot", "tree"]), ("a turtle", ["shell", "slow", "pond"]),
           ("a squirrel", ["nuts", "tree", "tail"]), ("a goldfish", ["bowl", "fins", "water"]),
           ("a parrot", ["feathers", "talk", "colors"]), ("a hedgehog", ["spines", "garden", "night"])]
PEOPLE = ["a coworker", "a neighbor", "my landlord", "a new teammate", "my grandmother", "an old friend",
          "my manager", "a customer", "my teacher", "a classmate", "my roommate", "a local shop owner"]
AUDIENCES = ["a ten-year-old", "a busy parent", "a college student", "a retired engineer", "a new employee",
             "a tourist", "a beginner", "a small business owner", "a high school class", "a grandparent"]
EVENTS = ["a surprise birthday party", "a neighborhood cleanup", "a book club meeting", "a charity bake sale",
          "a team lunch", "a garage sale", "a school science fair", "a family reunion", "a board game night",
          "a community garden opening"]
FAVORS = ["helping me move", "watering my plants", "covering my shift", "lending me a book", "fixing my bike",
          "cooking dinner for us", "giving me a ride", "reviewing my work"]

# Short passages written for this module (for summary tasks), each with keywords.
PASSAGES = [
    ("The town council voted to turn the empty lot on Main Street into a small park. Volunteers will "
     "plant trees in the spring, and the local school has offered to build benches in its workshop. "
     "The park should open before the summer festival.", ["park", "trees", "volunteers"]),
    ("Maya started baking bread during a long winter. Her first loaves were flat and dense, but she "
     "kept notes on every attempt. By spring her neighbors were asking to buy her sourdough, and she "
     "now sells a few loaves every Saturday.", ["bread", "neighbors", "notes"]),
    ("A group of students built a weather station from cheap sensors and a small computer. It records "
     "temperature, wind and rain every ten minutes and posts the numbers online. Farmers nearby now "
     "check it before deciding when to harvest.", ["sensors", "weather", "farmers"]),
    ("The library began lending tools as well as books. People can borrow drills, ladders and sewing "
     "machines for a week at a time. The program was so popular that the library doubled the number "
     "of tools in its first year.", ["library", "tools", "borrow"]),
    ("After the bridge closed for repairs, a ferry service started carrying commuters across the river. "
     "Many riders say the short boat trip is calmer than the traffic ever was, and some hope the "
     "ferry will keep running after the bridge reopens.", ["ferry", "bridge", "river"]),
    ("A small cafe replaced its paper cups with a deposit system. Customers pay a little extra for a "
     "sturdy cup and get the money back when they return it. In three months the cafe cut its waste "
     "by half.", ["cafe", "cups", "waste"]),
    ("Researchers followed a flock of geese with tiny trackers. They found that the birds rest at the "
     "same three lakes every autumn and fly mostly at night. The lakes are now protected during the "
     "migration season.", ["geese", "lakes", "migration"]),
    ("The neighborhood started a weekly walking group for older residents. It meets every Tuesday at "
     "the fountain and walks for forty minutes. Members say the chats along the way matter as much as "
     "the exercise.", ["walking", "Tuesday", "exercise"]),
    ("A young inventor designed a backpack with a solar panel on the front flap. On a sunny day it can "
     "charge a phone twice. She plans to sell it to hikers and to students who walk to school.",
     ["solar", "backpack", "phone"]),
    ("The orchestra invited the public to an open rehearsal. Visitors sat between the musicians and "
     "watched the conductor stop and restart passages. Many said they had never heard music so "
     "closely before.", ["orchestra", "rehearsal", "musicians"]),
    ("A fishing village built an artificial reef from old concrete blocks. Within two years small fish "
     "and crabs had moved in, and divers began visiting. The village now runs boat tours to the reef.",
     ["reef", "fish", "divers"]),
    ("The city painted bright crosswalks near every school. Drivers slowed down, and the number of "
     "near misses reported by crossing guards fell sharply in the first term.", ["crosswalks", "drivers", "school"]),
]

SLOTS: dict[str, list] = {"topic": TOPICS, "object": OBJECTS, "place": PLACES, "concept": CONCEPTS,
                          "animal": ANIMALS, "passage": PASSAGES, "person": PEOPLE, "audience": AUDIENCES,
                          "event": EVENTS, "favor": FAVORS}
GENERIC_KEYWORDS = ["today", "simple", "friend", "together", "future", "small", "idea", "world"]

# ------------------------------------------------------------------------------------- base tasks


@dataclass(frozen=True)
class Task:
    """A base task: ``id``, a template with ``{slot}`` fields, and whether it is a yes/no question."""

    id: str
    template: str
    yes_no: bool = False


TASKS: list[Task] = [Task(i, t) for i, t in [
    # emails, notes, letters
    ("email_thanks", "Write a short email to {person} thanking them for {favor}."),
    ("email_invite", "Write a brief email inviting {person} to {event}."),
    ("email_apology", "Write a short email to {person} apologizing for missing {event}."),
    ("email_request", "Write a short, polite email asking {person} for advice about {topic}."),
    ("email_product", "Write a short email to a friend recommending {object}."),
    ("note_fridge", "Write a short note for the fridge reminding my family about {event}."),
    ("note_neighbor", "Write a friendly note to {person} about a noisy party I am planning for {event}."),
    ("letter_future", "Write a short letter to my future self about {topic}."),
    ("letter_editor", "Write a short letter to a local newspaper in support of {topic}."),
    ("letter_thanks_teacher", "Write a brief thank-you letter to a teacher who got me interested in {concept}."),
    ("postcard", "Write the text of a postcard sent from {place}."),
    ("text_message", "Write a text message to {person} asking if they want to join me for {event}."),
    # stories, poems, creative
    ("story_animal", "Write a very short story about {animal} who visits {place}."),
    ("story_object", "Tell a tiny story in which {object} saves the day."),
    ("story_place", "Write a short story set in {place}."),
    ("story_kid", "Write a short bedtime story for a sleepy child about {animal}."),
    ("poem_topic", "Write a short poem about {topic}."),
    ("poem_place", "Write a short poem describing {place}."),
    ("poem_animal", "Write a short poem from the point of view of {animal}."),
    ("poem_concept", "Write a short poem that explains {concept}."),
    ("haiku_series", "Write a few lines of verse about {place} at night."),
    ("limerick", "Write a limerick about {animal}."),
    ("song_chorus", "Write the chorus of a cheerful song about {topic}."),
    ("diary", "Write a short diary entry by {animal} describing its day."),
    ("scene", "Describe a single moment in {place} as if it were the opening of a novel."),
    ("monologue", "Write a short monologue by {object} complaining about its owner."),
    # products, ads, reviews
    ("product_desc", "Write a short product description for {object}."),
    ("product_audience", "Describe {object} for {audience}."),
    ("ad_object", "Write a short advertisement for {object}."),
    ("ad_place", "Write a short ad encouraging tourists to visit {place}."),
    ("ad_event", "Write a short announcement for {event}."),
    ("slogan", "Suggest a slogan for {object} and explain it in a sentence or two."),
    ("review_object", "Write a short customer review of {object}."),
    ("review_place", "Write a short review of a visit to {place}."),
    ("pitch", "Pitch a small business idea related to {topic} in a few sentences."),
    ("tagline_event", "Write a short invitation text for {event}."),
    # explanations, definitions, facts
    ("explain_concept", "Explain {concept} in simple terms."),
    ("explain_audience", "Explain {concept} to {audience}."),
    ("explain_why", "Explain why {topic} matters."),
    ("define", "Give a short definition of {concept}."),
    ("define_example", "Define {concept} and give one everyday example."),
    ("facts_animal", "Share a few interesting facts about {animal}."),
    ("facts_concept", "Tell me something surprising about {concept}."),
    ("analogy", "Explain {concept} using an analogy about {place}."),
    ("history", "Briefly describe how people might have handled {topic} a hundred years ago."),
    ("eli5", "Describe {concept} the way you would to {audience}."),
    ("misconception", "Describe a common misconception about {concept} and correct it."),
    # advice, how-to, instructions
    ("advice_topic", "Give some advice to {audience} about {topic}."),
    ("advice_start", "How should {audience} get started with {topic}?"),
    ("tips_object", "Give a few tips for taking care of {object}."),
    ("howto_object", "Explain how to use {object} for the first time."),
    ("howto_topic", "Write short step-by-step instructions for getting better at {topic}."),
    ("packing", "What should I pack for a weekend trip to {place}?"),
    ("mistakes", "What are common beginner mistakes with {topic}?"),
    ("routine", "Suggest a simple weekly routine for {topic}."),
    ("safety", "Give safety advice for someone visiting {place}."),
    ("motivate", "Write a few encouraging words for {audience} who is struggling with {topic}."),
    # lists of ideas
    ("ideas_gift", "Suggest gift ideas for someone who loves {topic}."),
    ("ideas_event", "List ideas to make {event} more fun."),
    ("ideas_names", "Suggest names for {animal} and say why each fits."),
    ("ideas_uses", "List creative uses for {object}."),
    ("ideas_activities", "List things to do in {place}."),
    ("ideas_questions", "Suggest questions a student could ask about {concept}."),
    ("ideas_blog", "Suggest blog post titles about {topic}."),
    # summaries, rewrites
    ("summarize", "Summarize this passage: {passage}"),
    ("summarize_kid", "Summarize the following for {audience}: {passage}"),
    ("headline", "Write a headline and a one-sentence summary for this news item: {passage}"),
    ("takeaway", "What is the main lesson of this story? {passage}"),
    ("rewrite_formal", "Rewrite this passage in a more formal tone: {passage}"),
    ("questions_passage", "Write two quiz questions about this text: {passage}"),
    # comparisons
    ("compare_objects", "Compare {object} with a cheaper alternative."),
    ("compare_places", "Compare {place} with a big city."),
    ("compare_concepts", "What is the difference between {concept} and a related idea?"),
    ("pros_cons", "Give the pros and cons of {topic}."),
    ("compare_animals", "Compare {animal} with a pet rock, humorously."),
    # dialogue, jokes, riddles
    ("dialogue", "Write a short dialogue between {person} and me about {topic}."),
    ("dialogue_animal", "Write a short conversation between {animal} and a child."),
    ("joke_topic", "Tell a joke about {topic}."),
    ("joke_animal", "Tell a joke about {animal}."),
    ("riddle_object", "Write a riddle whose answer is {object}, then give the answer."),
    ("riddle_animal", "Write a riddle about {animal} and give the answer."),
    ("pun", "Make a pun about {concept} and explain why it is funny."),
    ("toast", "Write a short toast for {event}."),
    ("speech_open", "Write the opening lines of a speech for {audience} about {topic}."),
    ("bio", "Write a short bio for a mascot of {place} that is {animal}."),
    ("tweet", "Write a social media post about {topic}."),
    ("fortune", "Write a fortune cookie message about {topic} and explain it briefly."),
]] + [Task(i, t, yes_no=True) for i, t in [
    ("yn_topic", "Is {topic} worth trying for {audience}?"),
    ("yn_object", "Would {object} make a good gift for {person}?"),
    ("yn_place", "Is {place} a good place for a quiet holiday?"),
    ("yn_concept", "Can {concept} be explained without any math?"),
    ("yn_animal", "Would {animal} make a good pet for {audience}?"),
    ("yn_habit", "Should {audience} spend ten minutes a day on {topic}?"),
    ("yn_event", "Is it a good idea to plan {event} on a weekday?"),
    ("yn_buy", "Should I buy {object} if I live in a small apartment?"),
]]

_SLOT_RE = re.compile(r"\{(\w+)\}")

# ------------------------------------------------------------------------------------- constraints

END_PHRASES = ["Is there anything else I can help with?", "Let me know if you have any other questions.",
               "That is all for now.", "Have a wonderful day!", "Thanks for reading.", "Hope this helps!",
               "Any other questions?", "Talk soon."]
FIRST_WORDS = ["today", "first", "imagine", "remember", "honestly", "overall", "finally", "however", "sometimes",
               "once"]
FORBIDDEN_POOL = ["very", "really", "just", "good", "thing", "great", "nice", "important", "many", "always",
                  "also", "like"]
SECTION_SPLITTERS = ["Section", "SECTION", "Part", "PART"]

ALL_IDS = (
    "change_case:english_lowercase", "change_case:english_capital", "change_case:capital_word_frequency",
    "punctuation:no_comma", "length_constraints:number_words", "length_constraints:number_sentences",
    "length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word",
    "keywords:existence", "keywords:forbidden_words", "keywords:frequency", "keywords:letter_frequency",
    "detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections", "detectable_format:json_format", "detectable_format:title",
    "detectable_format:constrained_response", "startend:end_checker", "startend:quotation",
    "combination:repeat_prompt", "combination:two_responses", "detectable_content:number_placeholders",
    "detectable_content:postscript",
)

_CASE = ("change_case:english_lowercase", "change_case:english_capital", "change_case:capital_word_frequency")
_PARAGRAPH = ("length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word")
#: ids that may be combined with json_format (anything else changes the reply's outer shape).
JSON_OK = frozenset({"keywords:existence", "keywords:forbidden_words", "keywords:letter_frequency",
                     "keywords:frequency", "length_constraints:number_words"})
#: ids that may be combined with constrained_response (a reply that is mostly a fixed sentence).
CONSTRAINED_OK = frozenset({"punctuation:no_comma", "keywords:forbidden_words", "detectable_content:postscript",
                            "startend:end_checker", "length_constraints:number_words",
                            "length_constraints:number_sentences", "keywords:existence"})
#: Incompatible pairs (either order); json_format and constrained_response use the allow-lists above.
CONFLICTS: frozenset[frozenset[str]] = frozenset(frozenset(p) for p in [
    *[(a, b) for i, a in enumerate(_CASE) for b in _CASE[i + 1:]],
    *[(a, b) for a in ("change_case:english_lowercase", "change_case:english_capital") for b in (
        "detectable_format:multiple_sections", "combination:repeat_prompt", "startend:end_checker",
        "detectable_content:postscript", "detectable_content:number_placeholders")],
    ("change_case:english_lowercase", "detectable_format:title"),
    ("change_case:english_capital", "length_constraints:nth_paragraph_first_word"),
    ("change_case:capital_word_frequency", "detectable_format:multiple_sections"),
    (_PARAGRAPH[0], _PARAGRAPH[1]),
    ("length_constraints:number_words", "length_constraints:number_sentences"),
    *[("combination:two_responses", b) for b in (
        "startend:end_checker", "startend:quotation", "combination:repeat_prompt", *_PARAGRAPH,
        "detectable_format:number_bullet_lists", "detectable_format:multiple_sections", "detectable_format:title",
        "detectable_content:postscript", "detectable_format:number_highlighted_sections")],
    *[("startend:quotation", b) for b in (
        "combination:repeat_prompt", "detectable_format:number_bullet_lists", "detectable_format:multiple_sections",
        *_PARAGRAPH, "detectable_content:postscript")],
    *[("combination:repeat_prompt", b) for b in (
        "length_constraints:number_words", "length_constraints:number_sentences", *_PARAGRAPH,
        "punctuation:no_comma", "keywords:forbidden_words", "keywords:letter_frequency", "keywords:frequency",
        "change_case:capital_word_frequency")],
    ("detectable_format:number_bullet_lists", "length_constraints:number_sentences"),
    ("detectable_format:multiple_sections", _PARAGRAPH[0]),
    ("detectable_format:multiple_sections", _PARAGRAPH[1]),
])


def compatible(a: str, b: str) -> bool:
    """Whether instructions ``a`` and ``b`` can both be followed by one short reply."""
    if a == b or frozenset((a, b)) in CONFLICTS:
        return False
    for special, allowed in (("detectable_format:json_format", JSON_OK),
                             ("detectable_format:constrained_response", CONSTRAINED_OK)):
        if special in (a, b) and (b if a == special else a) not in allowed:
            return False
    return True


@dataclass
class Context:
    """What a constraint may draw on: the random source, the base request and keywords that fit it."""

    rng: random.Random
    request: str
    keywords: list[str]


Made = tuple[dict, str]  # (kwargs, sentence stating the constraint)


def _pick(ctx: Context, phrasings: list[str], **fields) -> str:
    return ctx.rng.choice(phrasings).format(**fields)


def _relation_words(relation: str, n: int, unit: str) -> str:
    return f"fewer than {n} {unit}" if relation == "less than" else f"at least {n} {unit}"


def _lowercase(ctx: Context) -> Made:
    return {}, _pick(ctx, [
        "Your entire reply must be in lowercase letters; no capitals at all.", "Write only in lowercase.",
        "Use lowercase letters only: not a single capital letter anywhere in your answer.",
        "Please answer in all lowercase, including the first word of each sentence.",
        "Make sure every letter in your response is lowercase."])


def _capital(ctx: Context) -> Made:
    return {}, _pick(ctx, [
        "Reply in English using capital letters only.", "WRITE YOUR WHOLE ANSWER IN CAPITAL LETTERS.",
        "Use only uppercase letters in your reply, from start to finish.",
        "Answer in all caps: every single letter must be uppercase.",
        "Please respond entirely in English uppercase letters; no lowercase letters at all."])


def _capital_words(ctx: Context) -> Made:
    if ctx.rng.random() < 0.6:
        n, rel = ctx.rng.randint(2, 4), "at least"
        return {"capital_frequency": n, "capital_relation": rel}, _pick(ctx, [
            "Write at least {n} words entirely in capital letters for emphasis.",
            "Include {n} or more words in ALL CAPS.", "Emphasize at least {n} words by writing them in all capitals.",
            "Somewhere in your answer, put at least {n} words in full uppercase."], n=n)
    n, rel = ctx.rng.randint(4, 6), "less than"  # "I" and "A" count as all-caps words too
    return {"capital_frequency": n, "capital_relation": rel}, _pick(ctx, [
        "Use fewer than {n} words written in all capital letters.", "Words in ALL CAPS should appear fewer than {n} times.",
        "Keep all-caps words to fewer than {n}.", "Do not write {n} or more words fully in uppercase."], n=n)


def _no_comma(ctx: Context) -> Made:
    return {}, _pick(ctx, [
        "Leave out commas completely.", "Avoid commas entirely.",
        "Your answer must not contain a single comma.", "Write without using the comma character at all.",
        "No commas are allowed anywhere in your reply."])


def _number_words(ctx: Context) -> Made:
    if ctx.rng.random() < 0.6:
        n, rel = ctx.rng.choice([30, 40, 50, 60, 80, 100]), "less than"
    else:
        n, rel = ctx.rng.choice([15, 20, 25, 30, 40]), "at least"
    w = _relation_words(rel, n, "words")
    return {"num_words": n, "relation": rel}, _pick(ctx, [
        "Your answer must contain {w}.", "Keep the response to {w}.", "Use {w} in total.",
        "The whole reply should have {w}.", "Write {w}, no matter what."], w=w)


def _number_sentences(ctx: Context) -> Made:
    if ctx.rng.random() < 0.6:
        n, rel = ctx.rng.randint(3, 6), "less than"
    else:
        n, rel = ctx.rng.randint(2, 4), "at least"
    w = _relation_words(rel, n, "sentences")
    return {"num_sentences": n, "relation": rel}, _pick(ctx, [
        "Keep it to {w}.", "Write {w}.", "Answer in {w}.", "Use {w} in your reply."], w=w)


def _number_paragraphs(ctx: Context) -> Made:
    n = ctx.rng.choice([2, 2, 3])
    return {"num_paragraphs": n}, _pick(ctx, [
        "Write exactly {n} paragraphs and put *** between neighboring paragraphs.",
        "Your reply must have {n} paragraphs. Put *** on its own line between paragraphs.",
        "Split your answer into {n} paragraphs and separate them with ***.",
        "Use {n} paragraphs, with the three asterisks *** between each pair of paragraphs."], n=n)


def _nth_paragraph(ctx: Context) -> Made:
    n = ctx.rng.choice([2, 2, 3])
    k = ctx.rng.randint(1, n)
    word = ctx.rng.choice(FIRST_WORDS)
    nth = {1: "first", 2: "second", 3: "third"}[k]
    return {"num_paragraphs": n, "nth_paragraph": k, "first_word": word}, _pick(ctx, [
        "Write exactly {n} paragraphs separated by a blank line, and start the {nth} paragraph with the word \"{w}\".",
        "Your reply needs {n} paragraphs with an empty line between them; begin the {nth} one with the word {w}.",
        "Answer in {n} paragraphs (blank line between them); paragraph {k} has to start with \"{w}\".",
        "Use {n} paragraphs divided by empty lines, and make \"{w}\" the first word of paragraph number {k}."],
        n=n, k=k, nth=nth, w=word)


def _existence(ctx: Context) -> Made:
    kws = ctx.rng.sample(ctx.keywords, min(len(ctx.keywords), ctx.rng.choice([1, 2, 2])))
    w = " and ".join(f'"{k}"' for k in kws)
    return {"keywords": kws}, _pick(ctx, [
        "Be sure to include the keywords {w}.", "Make sure to use the words {w}.",
        "Your answer must mention {w}.", "Work the words {w} into your reply.",
        "Be sure the response contains {w}."], w=w)


def _forbidden(ctx: Context) -> Made:
    words = ctx.rng.sample(FORBIDDEN_POOL, ctx.rng.choice([1, 2, 2, 3]))
    w = ", ".join(f'"{x}"' for x in words[:-1]) + (" or " if len(words) > 1 else "") + f'"{words[-1]}"'
    return {"forbidden_words": words}, _pick(ctx, [
        "Leave out the words {w} entirely.", "Avoid using the words {w}.",
        "Never use the word(s) {w} in your answer.", "The words {w} are not allowed in your reply."], w=w)


def _frequency(ctx: Context) -> Made:
    kw = ctx.rng.choice(ctx.keywords)
    n = ctx.rng.choice([2, 2, 3])
    return {"keyword": kw, "frequency": n, "relation": "at least"}, _pick(ctx, [
        "Use the word \"{k}\" at least {n} times.", "The word {k} should appear {n} or more times in your response.",
        "Mention \"{k}\" at least {n} times.", "Repeat the word \"{k}\" at least {n} times in your answer."], k=kw, n=n)


def _letter(ctx: Context) -> Made:
    if ctx.rng.random() < 0.5:
        letter, n, rel = ctx.rng.choice("aeiont"), ctx.rng.choice([5, 8, 10]), "at least"
        phr = ["Let the letter \"{l}\" show up at least {n} times.",
               "Use the letter {l} at least {n} times.", "Make sure the letter \"{l}\" occurs {n} or more times.",
               "Your reply needs at least {n} occurrences of the letter \"{l}\"."]
    else:
        letter, n, rel = ctx.rng.choice("qzxj"), ctx.rng.choice([2, 3]), "less than"
        phr = ["Let the letter \"{l}\" show up fewer than {n} times.",
               "Use the letter {l} fewer than {n} times.", "Keep the letter \"{l}\" to fewer than {n} occurrences.",
               "Avoid the letter \"{l}\": it may appear fewer than {n} times at most."]
    return {"letter": letter, "let_frequency": n, "let_relation": rel}, _pick(ctx, phr, l=letter, n=n)


def _bullets(ctx: Context) -> Made:
    n = ctx.rng.choice([2, 3, 3, 4])
    return {"num_bullets": n}, _pick(ctx, [
        "Give exactly {n} bullet points in markdown, like:\n* first point\n* second point",
        "Format the answer as exactly {n} bullet points, each line starting with \"* \".",
        "Give exactly {n} bullet points (markdown, \"* \" at the start of each), and no other bullets.",
        "Answer with a list of exactly {n} bullet points, each on its own line beginning with a dash \"- \"."], n=n)


def _highlights(ctx: Context) -> Made:
    n = ctx.rng.choice([1, 2, 2, 3])
    return {"num_highlights": n}, _pick(ctx, [
        "Emphasize at least {n} parts of the answer with markdown, for example *a key part*.",
        "Use markdown to highlight at least {n} parts, for example *like this*.",
        "Mark at least {n} phrases as highlighted by wrapping them in single asterisks, like *this*.",
        "Put at least {n} key phrases in italics using asterisks (*key phrase*)."], n=n)


def _sections(ctx: Context) -> Made:
    s, n = ctx.rng.choice(SECTION_SPLITTERS), ctx.rng.choice([2, 2, 3])
    return {"section_spliter": s, "num_sections": n}, _pick(ctx, [
        "Use {n} sections, each opening with its own label line, like:\n{s} 1\n...\n{s} 2\n...",
        "Split the answer into {n} sections labelled \"{s} 1\", \"{s} 2\" and so on.",
        "Organize your reply into {n} parts, each starting with a line \"{s} N\" where N is its number.",
        "Divide the response into {n} sections; begin each with {s} followed by its number (e.g. {s} 1)."], n=n, s=s)


def _json(ctx: Context) -> Made:
    return {}, _pick(ctx, [
        "Put the whole output in JSON; markdown code ticks (```) around it are fine.",
        "Give your whole answer as a valid JSON object.", "Respond only with JSON; no text outside the JSON.",
        "Format the entire reply as JSON (a code block with ```json is fine).",
        "Your output must be parseable JSON and nothing else."])


def _title(ctx: Context) -> Made:
    return {}, _pick(ctx, [
        "Give the answer a title placed between << and >>, for example <<morning light>>.",
        "Start with a title in double angle brackets, like <<A Good Title>>.",
        "Include a title, written as <<title>>.", "Your response must have a title enclosed in << and >>."])


def _constrained(ctx: Context) -> Made:
    return {}, _pick(ctx, [
        "Pick one of these replies and write it word for word: \"My answer is maybe.\", \"My answer is yes.\" or "
        "\"My answer is no.\"",
        "Your reply must include exactly one of these sentences: \"My answer is yes.\", \"My answer is no.\" or "
        "\"My answer is maybe.\"",
        "Choose one of these answers and write it exactly: My answer is yes. / My answer is no. / My answer is maybe.",
        "Respond using one of: \"My answer is yes.\", \"My answer is no.\", \"My answer is maybe.\" (copy it exactly)."])


def _end(ctx: Context) -> Made:
    p = ctx.rng.choice(END_PHRASES)
    return {"end_phrase": p}, _pick(ctx, [
        "Make \"{p}\" the exact final words of your reply, with nothing after it.",
        "End your answer with the words \"{p}\" and nothing after them.",
        "The very last words of your reply must be: {p}",
        "Close with exactly \"{p}\" as the final sentence."], p=p)


def _quotation(ctx: Context) -> Made:
    return {}, _pick(ctx, [
        "Your full reply should sit inside a pair of double quotation marks.", "Put your whole answer inside double quotes.",
        "Begin and end your reply with a double quotation mark (\").",
        "Enclose the full response in \"double quotes\"."])


def _repeat(ctx: Context) -> Made:
    return {"prompt_to_repeat": ctx.request}, _pick(ctx, [
        "Copy the request below exactly as written, then answer it; write nothing before the copy: {r}",
        "Start your reply by copying this request exactly, then answer it: {r}",
        "Begin by repeating the following request verbatim, and only then respond: {r}",
        "Before answering, restate this request word for word as the first thing you write: {r}"], r=ctx.request)


def _two(ctx: Context) -> Made:
    return {}, _pick(ctx, [
        "Offer two distinct answers, with ****** as the only thing between them.",
        "Write two different answers, separated by a line of six asterisks (******).",
        "Provide two versions of the answer, with ****** between them.",
        "Answer twice in two different ways; put ****** between the two answers and nowhere else."])


def _placeholders(ctx: Context) -> Made:
    n = ctx.rng.choice([1, 2, 2, 3])
    return {"num_placeholders": n}, _pick(ctx, [
        "Put at least {n} placeholders in square brackets (like [address]) in the reply.",
        "Include at least {n} placeholder(s) written in square brackets, like [name].",
        "Leave at least {n} blank(s) for me to fill in, written as [placeholder].",
        "Use at least {n} placeholders in square brackets (for example [date])."], n=n)


def _postscript(ctx: Context) -> Made:
    m = ctx.rng.choice(["P.S.", "P.S.", "P.P.S"])
    return {"postscript_marker": m}, _pick(ctx, [
        "After the main answer, add a postscript that opens with {m}",
        "Add a short postscript that begins with \"{m}\" after your answer.",
        "Finish with a note that starts with {m}", "Include a postscript at the end, marked {m}"], m=m)


MAKERS: dict[str, Callable[[Context], Made]] = {
    "change_case:english_lowercase": _lowercase, "change_case:english_capital": _capital,
    "change_case:capital_word_frequency": _capital_words, "punctuation:no_comma": _no_comma,
    "length_constraints:number_words": _number_words, "length_constraints:number_sentences": _number_sentences,
    "length_constraints:number_paragraphs": _number_paragraphs,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph, "keywords:existence": _existence,
    "keywords:forbidden_words": _forbidden, "keywords:frequency": _frequency, "keywords:letter_frequency": _letter,
    "detectable_format:number_bullet_lists": _bullets, "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:multiple_sections": _sections, "detectable_format:json_format": _json,
    "detectable_format:title": _title, "detectable_format:constrained_response": _constrained,
    "startend:end_checker": _end, "startend:quotation": _quotation, "combination:repeat_prompt": _repeat,
    "combination:two_responses": _two, "detectable_content:number_placeholders": _placeholders,
    "detectable_content:postscript": _postscript,
}
if set(MAKERS) != set(ALL_IDS):  # pragma: no cover - a guard for edits to the two tables above
    raise RuntimeError(f"constraint makers and ids differ: {sorted(set(MAKERS) ^ set(ALL_IDS))}")


# -------------------------------------------------------------------------------------- generation


def _fill(task: Task, rng: random.Random) -> tuple[str, list[str]]:
    """The task text with its slots filled, and keywords that fit (the fillers' words, else generic)."""
    keywords: list[str] = []
    values = {}
    for slot in dict.fromkeys(_SLOT_RE.findall(task.template)):
        v = rng.choice(SLOTS[slot])
        if isinstance(v, tuple):
            v, kws = v
            keywords += kws
        values[slot] = v
    return task.template.format(**values), keywords or list(GENERIC_KEYWORDS)


def _constraint_ids(task: Task, rng: random.Random) -> list[str]:
    k = rng.choices([1, 2, 3], weights=[45, 40, 15])[0]
    pool = [i for i in ALL_IDS if (task.yes_no or i != "detectable_format:constrained_response")
            and ("{passage}" not in task.template or i != "combination:repeat_prompt")]  # too long to repeat
    if task.yes_no and rng.random() < 0.5:  # yes/no questions mostly carry the option constraint
        chosen = ["detectable_format:constrained_response"]
    else:
        chosen = [rng.choice(pool)]
    while len(chosen) < k:
        options = [i for i in pool if all(compatible(i, c) for c in chosen)]
        if not options:
            break
        chosen.append(rng.choice(options))
    return chosen


def _clash(request: str, ids: list[str], kwargs: list[dict]) -> bool:
    """Whether the request itself makes a drawn constraint unfair (e.g. a keyword both required and
    forbidden, or a forbidden word inside the request that must be repeated)."""
    required = {w.lower() for kw in kwargs for w in kw.get("keywords", []) + [kw.get("keyword", "")] if w}
    forbidden = {w.lower() for kw in kwargs for w in kw.get("forbidden_words", [])}
    if required & forbidden:
        return True
    first = {kw["first_word"] for kw in kwargs if "first_word" in kw}
    return bool(first & forbidden)


def make_record(rng: random.Random, key: int) -> dict:
    """One prompt record: a random base task with 1 to 3 compatible constraints."""
    while True:
        task = rng.choice(TASKS)
        request, keywords = _fill(task, rng)
        ids = _constraint_ids(task, rng)
        ctx = Context(rng, request, keywords)
        made = [MAKERS[i](ctx) for i in ids]
        kwargs = [m[0] for m in made]
        if not _clash(request, ids, kwargs):
            break
    sentences = [m[1] for i, m in zip(ids, made) if i != "combination:repeat_prompt"]
    if "combination:repeat_prompt" in ids:  # its sentence quotes the request and ends the prompt, so the
        prompt = " ".join(sentences + [made[ids.index("combination:repeat_prompt")][1]])  # request is clear
    else:
        prompt = " ".join([request] + sentences)
    return {"key": key, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs,
            "messages": [{"role": "user", "content": prompt}], "task": task.id, "source": SOURCE}


def generate_constraint_prompts(n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct prompt records, the same for the same seed.

    Raises:
        ValueError: ``n`` is negative, or distinct prompts run out (far beyond any practical ``n``).
    """
    if n < 0:
        raise ValueError(f"--n must be >= 0, got {n}")
    rng = random.Random(seed)
    out: list[dict] = []
    seen: set[str] = set()
    misses = 0
    while len(out) < n:
        rec = make_record(rng, len(out))
        if rec["prompt"] in seen:
            misses += 1
            if misses > 50 * n + 1000:
                raise ValueError(f"could not draw {n} distinct prompts (got {len(out)}); ask for fewer")
            continue
        seen.add(rec["prompt"])
        out.append(rec)
    return out


def write_constraint_prompts(out: str | Path, n: int, seed: int = 0) -> dict:
    """Write ``n`` records to ``out`` (JSONL) and return counts per instruction id and per task."""
    records = generate_constraint_prompts(n, seed)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    per_id: dict[str, int] = {}
    for r in records:
        for i in r["instruction_id_list"]:
            per_id[i] = per_id.get(i, 0) + 1
    return {"records": len(records), "out": str(path), "per_instruction": dict(sorted(per_id.items())),
            "tasks": len({r["task"] for r in records}),
            "constraints_per_prompt": {k: sum(len(r["instruction_id_list"]) == k for r in records) for k in (1, 2, 3)}}
