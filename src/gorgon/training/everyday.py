"""A second family of composed chat requests (`compose --family everyday`), with its own templates and slots.

The `general` family's templates yield only ~2500 distinct requests, too few for a 1M-token distillation set
of greedy answers. This family adds other kinds of requests (reading a short passage, reasoning puzzles,
advice on a situation, tech support, careers, nature, writing for an occasion, word meanings...) and new
slot values for the old kinds, so the two families together give several thousand distinct requests. It
lives in its own module so that the `general` family, and what `compose --seed 0` gives for it (the shipped
data's reproduction commands rely on it), stay exactly as they were.

Every template, slot value and passage here was written for Gorgon; none comes from a benchmark.
"""

from __future__ import annotations

import random

# fmt: off
PHENOMENA = (
    "does ice float on water", "does bread rise", "does metal feel colder than wood", "does the Moon change shape",
    "does popcorn pop", "does a balloon stick to a wall after you rub it", "does the sea look blue",
    "does thunder follow lightning", "does milk go sour", "does a spoon look bent in a glass of water",
    "does my voice sound different on a recording", "does hair turn grey", "do cuts heal",
    "does a compass point north", "does soap clean things", "does a fridge hum", "does a kettle whistle",
    "do sunsets look red", "do my ears pop on a plane", "does coffee keep us awake",
    "does a moving bicycle stay upright", "does dough need to rest", "does glass break so easily",
    "do stars twinkle", "does the wind blow", "do some people get seasick", "does a boomerang come back",
    "does salt melt ice on roads", "does skin wrinkle in the bath", "do apples turn brown when cut",
    "does a candle flame point upwards", "does sound travel faster in water", "does a rubber band snap back",
    "does time seem to fly when we are busy", "do fried onions taste sweet", "do cats land on their feet",
    "does a mirror flip left and right but not up and down", "do we get goosebumps", "does the Moon look bigger near the horizon",
)
WHY_FORMS = (
    "Why {x}?", "Why {x}? Keep it short.", "Why {x}? Explain it simply.", "Quick question: why {x}?",
    "My daughter asked me: why {x}? How should I answer her?", "Why {x}? Explain the science behind it.",
)
CONCEPTS = (
    "inflation targeting", "the water table", "an algorithm", "a hypothesis", "photosynthesis in algae",
    "the bystander effect", "the tragedy of the commons", "a sonnet's structure", "impressionism",
    "stoicism", "the separation of powers", "compound words", "an ecosystem service", "the Doppler effect",
    "a food desert", "a gene mutation", "the Renaissance humanists", "a trade deficit", "a vaccine booster",
    "the circular economy", "an electric circuit", "the butterfly effect", "a haiku", "a fiscal policy",
    "the Dunning-Kruger effect", "a sustainable city", "an antibody", "social contract theory",
    "a peer review", "a supply chain", "magnetism", "a carbon tax", "the immune response to a cold",
    "an exchange rate", "a literary narrator", "the middle class", "a tsunami", "a crystal",
    "a hormone", "the ozone layer", "game theory", "a monopoly", "utilitarianism", "sound waves",
    "a compiler", "encryption", "an invasive species", "a constitution", "the nervous system",
    "a fossil", "static electricity", "a climate model", "a lunar eclipse", "an allergy",
)
AUDIENCES = (
    "a ten-year-old", "my grandmother", "a new employee", "a university student", "someone who hates maths",
    "a busy manager", "a curious teenager", "a friend over dinner", "a group of nurses", "a farmer",
)
CONCEPT_FORMS = (
    "How would you explain {c} to {a}?", "Explain {c} to {a}.", "What is {c}? Give a real-world example.",
    "Why does {c} matter? Explain it to {a}.", "Explain {c} in under 100 words.",
    "What is {c}, and what is a common misunderstanding about it?", "Teach me about {c} in three short points.",
)
PASSAGES = (
    ("The town council met on Tuesday to discuss the new bike lanes on Main Street. Shop owners said the lanes "
    "took away parking spaces, while cyclists said they felt much safer. The council agreed to review the plan "
    "in six months."),
    ("Maria started her bakery in 2015 with one oven and a loan from her brother. Today she employs twelve people "
    "and sells bread to three local schools. She says the secret is getting up at four every morning."),
    ("Our new phone has a larger screen, a battery that lasts two days and a camera that works well at night. It "
    "costs a little more than last year's model, but it comes with a free case and a two-year warranty."),
    ("Scientists found that people who walked for thirty minutes a day slept better and reported less stress. The "
    "study followed 500 adults for a year. The researchers say more work is needed to understand why."),
    ("The library will be closed from 1 to 14 March while the roof is repaired. Books can be returned at the "
    "post office during that time, and no late fees will be charged. The children's reading club will meet "
    "in the town hall instead."),
    ("Tom had always wanted to climb the mountain behind his village. On his sixtieth birthday he finally did it, "
    "slowly, with his daughter beside him. At the top he sat down, ate an apple and laughed."),
    ("Sales rose by 8% in the third quarter, mostly thanks to online orders. Costs also went up because of higher "
    "shipping prices. The company plans to open two new warehouses next year to deliver faster."),
    ("Honeybees visit up to a thousand flowers a day. They carry pollen from plant to plant, which helps fruit and "
    "vegetables grow. In many countries bee numbers are falling because of pesticides and the loss of wild "
    "meadows."),
    ("Dear team, thank you for your hard work this year. The office will close on 23 December and reopen on "
    "3 January. Please finish your timesheets before you leave and enjoy a well-earned rest."),
    ("The hotel was clean and the staff were friendly, but our room faced a busy road and we hardly slept. "
    "Breakfast was excellent. I would stay again, but I would ask for a room at the back."),
    ("In 1928 Alexander Fleming noticed that mould had killed the bacteria in one of his dishes. This chance "
    "discovery led to penicillin, the first widely used antibiotic, which has saved millions of lives."),
    ("Remote work gives people more flexibility and saves them time commuting. However, some workers feel lonely "
    "and find it hard to separate work from home life. Many companies now offer a mix of office and home days."),
    ("The recipe needs two cups of flour, one egg, a cup of milk and a pinch of salt. Mix everything until smooth, "
    "let it rest for ten minutes and cook small amounts in a hot pan until golden on both sides."),
    ("Jupiter is the largest planet in our solar system. It is mostly made of hydrogen and helium and has a giant "
    "storm, the Great Red Spot, that has lasted for hundreds of years. It has at least 90 moons."),
    ("Our football club is looking for volunteers to help with the summer tournament. Tasks include selling "
    "tickets, running the snack stall and cleaning up afterwards. Anyone interested should email Sarah by Friday."),
    ("The river flooded after three days of heavy rain. Around two hundred homes were evacuated, but no one was "
    "hurt. Volunteers handed out blankets and hot food at the school, which served as a shelter."),
)
PASSAGE_TASKS = (
    "Summarise this text in one sentence:", "What are the key points of this text?", "Give this text a title:",
    "What is the tone of this text?", "Turn this text into a bulleted list:",
    "Write three questions a teacher could ask about this text:", "Rewrite this text for a young child:",
    "Extract all the names, dates and numbers from this text:", "Make this text shorter and clearer:",
    "Translate this text into Spanish:", "Write a reply to this text:",
)
NAMES = (
    "Alice", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Isla", "Jack", "Kenji", "Lena",
    "Mateo", "Nina", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara",
)
RELATIONS = (
    "sister", "neighbour", "boss", "best friend", "teenage son", "flatmate", "partner", "colleague",
    "father", "landlord", "teacher", "new friend", "mother-in-law", "business partner",
)
SITUATIONS = (
    "keeps borrowing money and not paying it back", "never replies to my messages",
    "wants me to help them move house this weekend", "is always late", "takes credit for my work",
    "plays loud music late at night", "forgot my birthday", "asked me to keep a secret I am not comfortable with",
    "wants to start a business with me", "criticises my cooking", "is spending too much time on their phone",
    "wants me to join them on a trip I cannot afford", "seems stressed and quiet lately",
    "keeps giving me advice I did not ask for", "invited me to a party where I know nobody",
)
SITUATION_FORMS = (
    "My {r} {s}. What should I do?", "How do I talk to my {r}, who {s}?",
    "My {r} {s}. How can I handle this politely?", "What would you say to a {r} who {s}?",
)
DEVICES_PROBLEMS = (
    ("laptop", "is very slow"), ("phone", "battery drains quickly"), ("Wi-Fi", "keeps disconnecting"),
    ("printer", "says it is offline"), ("computer", "will not turn on"), ("phone", "storage is full"),
    ("email", "is full of spam"), ("TV", "has no sound"), ("laptop", "is overheating"),
    ("headphones", "will not connect over Bluetooth"), ("smart speaker", "does not understand me"),
    ("tablet", "screen is frozen"), ("keyboard", "types the wrong letters"), ("car", "makes a clicking noise"),
    ("washing machine", "leaves clothes wet"), ("fridge", "is too warm"), ("phone", "will not charge"),
)
DEVICE_FORMS = (
    "My {d} {p}. How can I fix it?", "My {d} {p}. What could be wrong?",
    "What should I check first if my {d} {p}?", "Help! My {d} {p}.",
)
JOBS = (
    "a nurse", "a software engineer", "an architect", "a pilot", "a data analyst", "an electrician",
    "a pharmacist", "a journalist", "a physiotherapist", "a teacher", "a graphic designer", "a lawyer",
    "a chef", "a vet", "an accountant", "a firefighter", "a translator", "a park ranger", "a dentist",
    "a project manager", "a social worker", "a carpenter", "a marine biologist", "a UX designer",
)
CAREER_FORMS = (
    "What does {j} do all day?", "How do I become {j}?", "What skills does {j} need?",
    "Is it a good idea to become {j}? What are the pros and cons?", "Write a job advert for {j}.",
    "What questions might I be asked in an interview to become {j}?", "Describe a typical week of {j}.",
)
ANIMALS = (
    "octopuses", "elephants", "penguins", "owls", "wolves", "dolphins", "honeybees", "tortoises", "koalas",
    "crows", "sharks", "hedgehogs", "giraffes", "ants", "camels", "butterflies", "bats", "polar bears",
    "frogs", "horses", "parrots", "whales", "foxes", "squirrels", "chameleons", "salmon",
)
ANIMAL_FORMS = (
    "Tell me some interesting facts about {a}.", "How do {a} communicate?", "What do {a} eat?",
    "Where do {a} live, and why?", "How intelligent are {a}?", "Write a short poem about {a}.",
    "Why are {a} important for nature?", "How do {a} raise their young?",
)
OCCASIONS = (
    "my best friend's wedding", "my colleague's retirement", "my parents' 40th anniversary",
    "a school graduation", "the opening of a new community garden", "my sister's 30th birthday",
    "a charity fundraiser", "the end of a successful project", "a farewell party for a neighbour",
    "the first day of a new school year", "a family reunion", "an award ceremony for volunteers",
)
OCCASION_FORMS = (
    "Write a short speech for {o}.", "Write a toast for {o}.", "Write a card message for {o}.",
    "Help me write a few words to say at {o}.", "Write a funny but kind speech for {o}.",
)
PRODUCTS = (
    "a reusable water bottle", "noise-cancelling earbuds", "a handmade candle", "a standing desk",
    "a children's picture book about space", "an electric bike", "organic honey", "a smart watch",
    "a yoga mat", "a camping tent for two", "a coffee grinder", "a backpack for students", "a board game",
    "a plant-based protein bar", "a pair of running shoes", "a language-learning app", "a wool blanket",
)
PRODUCT_FORMS = (
    "Write a product description for {p}.", "Write a short advert for {p}.", "Give me five slogans for {p}.",
    "Write an Instagram post announcing {p}.", "Write a customer review of {p}.",
    "Write a product description for {p} for an online shop, in under 80 words.",
)
WORDS = (
    "serendipity", "resilient", "ubiquitous", "pragmatic", "ephemeral", "meticulous", "ambiguous",
    "nostalgia", "eloquent", "candid", "benevolent", "procrastinate", "tenacious", "whimsical", "empathy",
    "frugal", "diligent", "skeptical", "gregarious", "mundane", "vivid", "obsolete", "inevitable", "humble",
)
WORD_FORMS = (
    "What does the word \"{w}\" mean? Use it in a sentence.", "Give me synonyms for \"{w}\".",
    "What is the opposite of \"{w}\"?", "Write a short paragraph that uses the word \"{w}\" correctly.",
    "Where does the word \"{w}\" come from?", "Explain \"{w}\" with three example sentences.",
)
PEOPLE = (
    "Leonardo da Vinci", "Ada Lovelace", "Nelson Mandela", "Isaac Newton", "Frida Kahlo", "Charles Darwin",
    "Cleopatra", "Mahatma Gandhi", "Albert Einstein", "Jane Austen", "Galileo Galilei", "Florence Nightingale",
    "Wolfgang Amadeus Mozart", "Rosa Parks", "Confucius", "William Shakespeare", "Nikola Tesla",
    "Amelia Earhart", "Socrates", "Queen Victoria", "Vincent van Gogh", "Martin Luther King Jr.",
)
PERSON_FORMS = (
    "Who was {p} and why are they famous?", "Write a short biography of {p}.",
    "What can we learn from the life of {p}?", "What were the greatest achievements of {p}?",
    "Tell me three surprising facts about {p}.", "Imagine an interview with {p}. Write three questions and answers.",
)
CHOICES = (
    ("learn Spanish", "learn German"), ("take a gap year", "go straight to university"),
    ("buy a new car", "buy a used one"), ("work from home", "go to the office"),
    ("get a cat", "get a dog"), ("move to a bigger flat", "stay and save money"),
    ("study medicine", "study engineering"), ("go to the gym", "exercise at home"),
    ("take the job with more money", "take the job I enjoy more"), ("travel alone", "travel with a group"),
    ("cook at home", "order takeaway more often"), ("pay off my loan early", "invest the money"),
    ("learn the piano", "learn the guitar"), ("rent a flat in the centre", "rent a house in the suburbs"),
)
CHOICE_FORMS = (
    "Should I {a} or {b}?", "I can't decide whether to {a} or {b}. Can you help?",
    "What should I think about before deciding to {a} or {b}?", "Help me make a list of pros and cons: {a} or {b}?",
)
SPEAKERS = (
    ("a teacher", "a student who missed homework"), ("a doctor", "a nervous patient"),
    ("two friends", "planning a holiday"), ("a shop assistant", "a customer returning a jacket"),
    ("a parent", "a child who wants a puppy"), ("a robot", "a child"), ("two astronauts", "on the Moon"),
    ("a waiter", "a very picky diner"), ("a coach", "a player before a final"),
    ("a landlord", "a new tenant"), ("two neighbours", "arguing about a fence"),
    ("a scientist", "a journalist"), ("a grandfather", "his granddaughter"),
)
DIALOGUE_FORMS = (
    "Write a short dialogue between {a} and {b}.", "Write a funny conversation between {a} and {b}.",
    "Write a scene with {a} and {b}.", "Write a conversation between {a} and {b} that ends happily.",
)
THEMES = (
    "the importance of reading", "why sleep matters", "the future of electric cars", "learning from failure",
    "the value of friendship", "how technology changes families", "why we should protect forests",
    "the benefits of learning music", "city life versus village life", "the role of sport in schools",
    "why history matters", "kindness to strangers", "the joy of cooking", "how to live with less stuff",
    "the benefits of volunteering", "artificial intelligence at work", "why travel broadens the mind",
    "the importance of clean water", "growing up with smartphones", "the meaning of success",
)
ESSAY_FORMS = (
    "Write a short essay on {t}.", "Write a blog post about {t}.", "Write a speech for students on {t}.",
    "Write a newspaper opinion piece about {t}.", "Give me an outline for an essay on {t}.",
    "Write a short motivational post about {t}.",
)
HEALTH = (
    "drinking coffee every day", "running on a treadmill", "eating late at night", "standing desks",
    "cold showers", "skipping breakfast", "walking 10,000 steps a day", "taking vitamin D",
    "stretching before exercise", "drinking sparkling water", "napping in the afternoon", "swimming",
    "eating spicy food", "intermittent fasting", "meditating for ten minutes a day", "cycling to work",
    "lifting weights after 50", "sitting all day", "eating eggs every morning", "drinking green tea",
)
HEALTH_FORMS = (
    "Is {h} good for me?", "What are the benefits of {h}?", "What happens to the body with {h}?",
    "Are there any risks in {h}?", "What does the research say about {h}?",
)
MONEY = (
    "save for a house deposit", "build an emergency fund", "start investing with a small amount",
    "make a monthly budget", "cut my energy bills", "save for retirement in my thirties",
    "split bills fairly with a flatmate", "teach my kids about money", "plan for a big wedding",
    "pay less for my phone plan", "avoid impulse buying", "save money while studying",
    "prepare my finances for a baby", "get out of debt", "choose a savings account",
)
MONEY_FORMS = (
    "How can I {m}?", "What is a good plan to {m}?", "Give me practical tips to {m}.",
    "I earn about {n} a month. How can I {m}?",
)
INCOMES = ("$1,800", "$2,500", "$3,200", "$4,000", "€2,000", "£2,300", "$5,500")
PLANS = (
    "a picnic for twenty people", "a surprise party for my dad", "a study plan for final exams",
    "a weekly meal plan for a vegetarian family", "a three-month plan to learn to code",
    "a daily routine for working from home", "a one-day trip to the seaside with kids",
    "a charity bake sale", "a cleaning schedule for a shared flat", "a beginner's strength training week",
    "a reading challenge for a book club", "a move to a new city", "a small wedding on a budget",
    "a garden makeover in spring", "a quiz night at the pub", "a language exchange meetup",
)
PLAN_FORMS = (
    "Help me plan {p}.", "Create a checklist for {p}.", "Make a schedule for {p}.",
    "What do I need to think about for {p}?", "Give me a step-by-step plan for {p}.",
)
LIST_ASKS = (
    "famous paintings and who painted them", "books every teenager should read", "words that rhyme with \"light\"",
    "easy houseplants for beginners", "board games for a family evening", "ways to reuse glass jars",
    "questions to ask on a first date", "classic films from the 1980s", "healthy breakfast ideas",
    "fun facts about the human brain", "things to do on a rainy day", "inventions that changed the world",
    "tips for a long car journey", "famous bridges around the world", "hobbies you can start for free",
    "ways to be more environmentally friendly at home", "icebreaker games for a meeting",
    "good habits for university students", "national dishes from different countries",
)
LIST_FORMS = ("List {n} {x}.", "Give me {n} {x}.", "What are {n} {x}?", "Name {n} {x}, with one line on each.")
ROLES = (
    "a wise old librarian", "a ship's captain in a storm", "a friendly alien visiting Earth",
    "a tour guide in Kyoto", "a fitness coach", "a Roman senator", "a detective at a crime scene",
    "a gardener", "a space station commander", "a 1920s jazz musician", "a math tutor", "a bookshop owner",
    "a weather forecaster", "a wildlife photographer", "a museum curator", "a medieval innkeeper",
)
ROLE_ASKS = (
    "Introduce yourself.", "Describe a typical day.", "What advice would you give me?",
    "Tell me about the hardest moment of your career.", "What do you love most about your work?",
    "Answer my question: what should I do this weekend?", "Describe what you can see right now.",
)
ROLE_FORMS = ("Pretend you are {r}. {a}", "Play the role of {r}. {a}", "Imagine you are {r}. {a}")
# fmt: on


def _puzzle(rng: random.Random) -> str:
    """A small reasoning puzzle with fresh names and numbers."""
    a, b, c, d = rng.sample(NAMES, 4)
    n, m = rng.randint(3, 12), rng.randint(2, 9)
    given = rng.randint(1, n - 1)
    forms = (
        lambda: f"{a} is taller than {b}, and {b} is taller than {c}. Who is the shortest? Explain.",
        lambda: (
            f"{a} is older than {b}. {c} is younger than {b} but older than {d}. Put them in order of age."
        ),
        lambda: f"{a} has {n} sweets and gives {b} {given} of them. {b} already had {m}. Who has more now?",
        lambda: (
            f"If {a} reads {m} pages a day, how many days will it take to finish a book of {m * n * 10} pages?"
        ),
        lambda: (
            f"{a}, {b} and {c} share a pizza cut into {n * 3} slices equally. How many slices does each get?"
        ),
        lambda: (
            f"{a} leaves home at {m}:00 and walks at {rng.randint(3, 6)} km/h to a place {n} km away. "
            f"When does {a} arrive?"
        ),
        lambda: f"{a} is {b}'s mother. {c} is {a}'s father. How is {c} related to {b}?",
        lambda: (
            f"A train leaves at {m}:{rng.choice(('15', '30', '45'))} and the trip takes {n * 10} minutes. "
            "When does it arrive?"
        ),
        lambda: f"{a} is sitting to the left of {b}, and {c} is to the right of {b}. Who is in the middle?",
        lambda: f"If it takes {m} people {n} hours to paint a fence, how long would {m * 2} people take?",
        lambda: (
            f"{a} has twice as many books as {b}, and together they have {3 * (n + m)}. "
            f"How many books does {b} have?"
        ),
        lambda: (
            f"All of {a}'s cats are black. {b}'s pet is black. Does that mean {b}'s pet is one of {a}'s cats?"
        ),
    )
    return rng.choice(forms)()


def _passage_request(rng: random.Random) -> str:
    # One line, as `compose` makes every request (it collapses whitespace): the task, then the passage.
    return f"{rng.choice(PASSAGE_TASKS)} {rng.choice(PASSAGES)}"


def everyday_request(rng: random.Random) -> str:
    """One request of a random kind (each kind equally likely)."""
    pick = rng.choice
    kinds = (
        lambda: pick(WHY_FORMS).format(x=pick(PHENOMENA)),
        lambda: pick(CONCEPT_FORMS).format(c=pick(CONCEPTS), a=pick(AUDIENCES)),
        lambda: _passage_request(rng),
        lambda: _puzzle(rng),
        lambda: pick(SITUATION_FORMS).format(r=pick(RELATIONS), s=pick(SITUATIONS)),
        lambda: pick(DEVICE_FORMS).format(d=(dp := pick(DEVICES_PROBLEMS))[0], p=dp[1]),
        lambda: pick(CAREER_FORMS).format(j=pick(JOBS)),
        lambda: pick(ANIMAL_FORMS).format(a=pick(ANIMALS)),
        lambda: pick(OCCASION_FORMS).format(o=pick(OCCASIONS)),
        lambda: pick(PRODUCT_FORMS).format(p=pick(PRODUCTS)),
        lambda: pick(WORD_FORMS).format(w=pick(WORDS)),
        lambda: pick(PERSON_FORMS).format(p=pick(PEOPLE)),
        lambda: pick(CHOICE_FORMS).format(a=(ch := pick(CHOICES))[0], b=ch[1]),
        lambda: pick(DIALOGUE_FORMS).format(a=(sp := pick(SPEAKERS))[0], b=sp[1]),
        lambda: pick(ESSAY_FORMS).format(t=pick(THEMES)),
        lambda: pick(HEALTH_FORMS).format(h=pick(HEALTH)),
        lambda: pick(MONEY_FORMS).format(m=pick(MONEY), n=pick(INCOMES)),
        lambda: pick(PLAN_FORMS).format(p=pick(PLANS)),
        lambda: pick(LIST_FORMS).format(n=rng.randint(3, 10), x=pick(LIST_ASKS)),
        lambda: pick(ROLE_FORMS).format(r=pick(ROLES), a=pick(ROLE_ASKS)),
    )
    return pick(kinds)()
